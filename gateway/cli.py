"""The ``gateway`` command: ``gateway run`` serves everything; ``gateway manage`` is manage.py."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    import django

    django.setup()


def cmd_run(args: argparse.Namespace) -> int:
    """Apply migrations, then serve HTTP and WebSockets with daphne until SIGTERM/SIGINT."""
    if args.protocols is not None:
        os.environ["GATEWAY_PROTOCOLS"] = args.protocols
    # ``kill -USR1 <pid>`` writes every thread's stack to stderr: what a stuck process is
    # doing, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _setup_django()
    from django.conf import settings
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    from gateway.adapters import (
        RunContext,
        RunRefused,
        adapters_enabled,
        is_loopback,
        warn,
    )

    if args.protocols is not None:  # the settings were read for the options already
        settings.GATEWAY_PROTOCOLS = [p.strip() for p in args.protocols.split(",") if p.strip()]

    try:
        call_command("check", fail_level="ERROR")
    except SystemCheckError as exc:
        print(f"gateway run refused:\n{exc}", file=sys.stderr, flush=True)
        return 2
    if not args.no_migrate:
        _migrate()

    from channels.layers import InMemoryChannelLayer, get_channel_layer

    from gateway.presence import presence_purge

    # Before serving: a restarted gateway must not show the members of its previous life.
    presence_purge(single_process=isinstance(get_channel_layer(), InMemoryChannelLayer))

    from gateway.asgi import application
    from gateway.server import GatewayServer

    def announce(address) -> None:
        host = args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        print(f"Gateway running at http://{host}:{address.port}/  (Ctrl+C to stop)", flush=True)

    if settings.DEBUG and not is_loopback(args.host):
        warn(f"development mode (DJANGO_DEBUG=1) on {args.host}: the site, with Django's "
              f"debug pages, is reachable from other machines. Use DJANGO_DEBUG=0 for that.")
    try:
        context = RunContext(application=application, options=args)
        from gateway.retention import Pruner

        # The core's own periodic work first, then each protocol's servers.
        services = [Pruner(), *(server for adapter in adapters_enabled()
                                for server in adapter.servers(context))]
    except RunRefused as exc:
        print(f"gateway run refused: {exc}", file=sys.stderr, flush=True)
        return 2
    interface = args.host.replace(":", r"\:")
    limits = settings.GATEWAY
    frame_limit = limits["WS_MAX_FRAME_BYTES"]
    server = GatewayServer(
        application,
        services=services,
        # A connect storm must not overflow the accept queue (Twisted's default is 50: the
        # kernel then drops SYNs and the clients retry a second later).
        endpoints=[f"tcp:port={args.port}:interface={interface}:backlog={LISTEN_BACKLOG}"],
        websocket_max_message_size=frame_limit,
        websocket_max_frame_size=frame_limit,
        websocket_handshake_timeout=limits["WS_HANDSHAKE_TIMEOUT"],
        ping_interval=limits["WS_PING_INTERVAL"],
        ping_timeout=limits["WS_PING_TIMEOUT"],
        websocket_connect_timeout=limits["WS_HANDSHAKE_TIMEOUT"],
        header_timeout=limits["HTTP_HEADER_TIMEOUT"],
        idle_timeout=limits["HTTP_IDLE_TIMEOUT"],
        on_listening=announce,
        verbosity=0,
    )
    server.run()
    return server.exit_code


def _migrate() -> None:
    """Apply migrations; on PostgreSQL under an advisory lock, so replicas starting together
    take turns (the first applies them, the others find nothing to do)."""
    from django.core.management import call_command
    from django.db import connection

    if connection.vendor != "postgresql":
        call_command("migrate", interactive=False, verbosity=0)
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
        try:
            call_command("migrate", interactive=False, verbosity=0)
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])


LISTEN_BACKLOG = 1024  # connections the kernel holds for accept (capped by net.core.somaxconn)
MIGRATION_LOCK = 7_215_001  # the gateway's advisory lock id for migrations


def cmd_manage(args: argparse.Namespace) -> int:
    _setup_django()
    from django.core.management import execute_from_command_line

    execute_from_command_line(["gateway manage", *args.rest])
    return 0


def build_parser() -> argparse.ArgumentParser:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from gateway.adapters import adapters_all

    adapters = adapters_all()  # their modules are light: nothing of Django is set up yet
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the gateway (applies migrations first)")
    run.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    run.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8000")))
    run.add_argument("--no-migrate", action="store_true", help="do not apply migrations")
    run.add_argument(
        "--protocols", default=None,
        help=f"the protocols to run, any of {','.join(adapters)} (default: GATEWAY_PROTOCOLS, "
        "or all). Without web, HTTP serves only /healthz, /readyz, /metrics and the other "
        "protocols' routes",
    )
    for adapter in adapters.values():  # each protocol's own options
        adapter.add_arguments(run)
    run.set_defaults(func=cmd_run)
    manage = sub.add_parser("manage", help="Django management commands (createsuperuser, ...)")
    manage.add_argument("rest", nargs=argparse.REMAINDER)
    manage.set_defaults(func=cmd_manage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

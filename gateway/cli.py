"""The ``gateway`` command: ``gateway run`` serves everything; ``gateway manage`` is manage.py."""

from __future__ import annotations

import argparse
import os
import sys


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    import django

    django.setup()


def cmd_run(args: argparse.Namespace) -> int:
    """Apply migrations, then serve HTTP and WebSockets with daphne until SIGTERM/SIGINT."""
    _setup_django()
    from django.conf import settings
    from django.core.management import call_command

    if not args.no_migrate:
        call_command("migrate", interactive=False, verbosity=0)
    call_command("check", fail_level="ERROR")

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

    interface = args.host.replace(":", r"\:")
    frame_limit = settings.GATEWAY["WS_MAX_FRAME_BYTES"]
    server = GatewayServer(
        application,
        endpoints=[f"tcp:port={args.port}:interface={interface}"],
        websocket_max_message_size=frame_limit,
        websocket_max_frame_size=frame_limit,
        on_listening=announce,
        verbosity=0,
    )
    server.run()
    return 0


def cmd_manage(args: argparse.Namespace) -> int:
    _setup_django()
    from django.core.management import execute_from_command_line

    execute_from_command_line(["gateway manage", *args.rest])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the gateway (applies migrations first)")
    run.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    run.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8000")))
    run.add_argument("--no-migrate", action="store_true", help="do not apply migrations")
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

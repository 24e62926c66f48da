"""The ``gateway`` command: ``gateway run`` serves everything; ``gateway manage`` is manage.py."""

from __future__ import annotations

import argparse
import faulthandler
import ipaddress
import logging
import os
import signal
import socket
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

    if settings.DEBUG and not _is_loopback(args.host):
        _warn(f"development mode (DJANGO_DEBUG=1) on {args.host}: the site, with Django's "
              f"debug pages, is reachable from other machines. Use DJANGO_DEBUG=0 for that.")
    try:
        services = _protocol_services(args, application)
    except RunRefused as exc:
        print(f"gateway run refused: {exc}", file=sys.stderr, flush=True)
        return 2
    interface = args.host.replace(":", r"\:")
    limits = settings.GATEWAY
    frame_limit = limits["WS_MAX_FRAME_BYTES"]
    server = GatewayServer(
        application,
        services=services,
        endpoints=[f"tcp:port={args.port}:interface={interface}"],
        websocket_max_message_size=frame_limit,
        websocket_max_frame_size=frame_limit,
        websocket_handshake_timeout=limits["WS_HANDSHAKE_TIMEOUT"],
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


MIGRATION_LOCK = 7_215_001  # the gateway's advisory lock id for migrations


def _protocol_services(args: argparse.Namespace, application) -> list:
    """The protocol servers besides daphne that this process runs."""
    return [*_mqtt_services(args, application), *_telegram_services(application)]


def _telegram_services(application) -> list:
    from django.conf import settings

    telegram = settings.TELEGRAM
    if not telegram["TOKEN"] or "telegram" not in settings.GATEWAY_PROTOCOLS:
        return []
    from protocols.telegram.server import SendLimits, TelegramServer, telegram_bot

    return [TelegramServer(
        application,
        bot=telegram_bot(telegram["TOKEN"], api_url=telegram["API_URL"]),
        webhook_url=telegram["WEBHOOK_URL"],
        webhook_secret=telegram["WEBHOOK_SECRET"],
        poll_timeout=telegram["POLL_TIMEOUT"],
        idle_timeout=telegram["IDLE_TIMEOUT"],
        limits=SendLimits(
            chat_per_second=telegram["CHAT_RATE"], group_per_minute=telegram["GROUP_RATE"],
            overall_per_second=telegram["OVERALL_RATE"], backlog=telegram["CHAT_BACKLOG"],
        ),
    )]


def _mqtt_services(args: argparse.Namespace, application) -> list:
    from django.conf import settings

    mqtt = settings.MQTT
    if args.no_mqtt or not mqtt["ENABLED"] or "mqtt" not in settings.GATEWAY_PROTOCOLS:
        return []
    from protocols.mqtt.server import BrokerAddress, MqttServer

    client_id = (mqtt["CLIENT_ID"] or f"rt-gateway-{socket.gethostname()}-{args.port}")[:128]
    services: list = []
    if mqtt["URL"]:
        address = BrokerAddress.from_url(mqtt["URL"])
    else:
        broker = _embedded_broker(args, client_id)
        if broker is None:
            return []
        services.append(broker)
        # The gateway's own client logs in with this process's credentials (never logged).
        address = BrokerAddress(host=_connect_host(broker.host), port=broker.port,
                                username=broker.policy.gateway_user,
                                password=broker.policy.gateway_password)
    services.append(MqttServer(
        application, address=address, prefix=mqtt["TOPIC_PREFIX"],
        client_id=client_id, idle_timeout=mqtt["IDLE_TIMEOUT"],
        keepalive=mqtt["KEEPALIVE"], shared_group=mqtt["SHARED_GROUP"],
    ))
    return services


class RunRefused(Exception):
    """A setting ``gateway run`` cannot start with; the message says which and why."""


def _embedded_broker(args: argparse.Namespace, client_id: str):
    """The embedded broker (MQTT_URL empty), or None when its port is taken."""
    from django.conf import settings

    from protocols.mqtt.broker import EmbeddedBroker

    mqtt = settings.MQTT
    host = mqtt["EMBEDDED_HOST"]
    port = args.mqtt_port if args.mqtt_port is not None else mqtt["EMBEDDED_PORT"]
    if args.mqtt_port is None and not _port_free(host, port):
        print(f"MQTT left out: port {port} is taken (another broker?). Use it with "
              f"MQTT_URL=mqtt://127.0.0.1:{port}, or move ours with --mqtt-port.",
              file=sys.stderr, flush=True)
        return None
    if not _is_loopback(host):
        _warn(f"the embedded MQTT broker listens on {host}:{port}, reachable from other "
              f"machines (MQTT_EMBEDDED_HOST). It is meant for development and small setups; "
              f"anonymous devices are {'ALLOWED' if mqtt['ALLOW_ANONYMOUS'] else 'refused'}. "
              f"For production use Mosquitto with MQTT_URL (deploy/mosquitto).")
    if not mqtt["ALLOW_ANONYMOUS"] and not mqtt["DEVICE_PASSWORDS"]:
        _warn("the embedded MQTT broker accepts no device: anonymous clients are refused "
              "(production mode or GATEWAY_REQUIRE_LOGIN=1) and MQTT_DEVICE_PASSWORDS is empty.")
    try:
        return EmbeddedBroker(
            host, port, prefix=mqtt["TOPIC_PREFIX"], gateway_client_id=client_id,
            device_passwords=mqtt["DEVICE_PASSWORDS"], allow_anonymous=mqtt["ALLOW_ANONYMOUS"],
            max_packet_size=mqtt["MAX_PACKET_SIZE"],
        )
    except (OSError, UnicodeDecodeError) as exc:
        raise RunRefused(f"MQTT_DEVICE_PASSWORDS: cannot read it ({exc})") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well be reachable


def _connect_host(host: str) -> str:
    """Where this process's own client reaches a broker bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _warn(text: str) -> None:
    """Said loudly: on stderr and as a WARNING log line."""
    print(f"WARNING: {text}", file=sys.stderr, flush=True)
    logging.getLogger("gateway.cli").warning(text)


def _port_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port``. With SO_REUSEADDR, as the broker binds:
    after a crash the port's old connections linger in TIME_WAIT for a minute, and without
    it they would count as taken."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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
    run.add_argument("--mqtt-port", type=int, default=None,
                     help="port of the embedded MQTT broker (default MQTT_EMBEDDED_PORT, 1883)")
    run.add_argument("--no-mqtt", action="store_true", help="leave MQTT out")
    run.add_argument(
        "--protocols", default=None,
        help="the protocol servers to run, any of web,mqtt,telegram (default: "
        "GATEWAY_PROTOCOLS, or all). Without web, HTTP serves only /healthz, /readyz, "
        "/metrics (and Telegram's webhook)",
    )
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

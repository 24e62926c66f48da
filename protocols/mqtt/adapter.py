"""The MQTT adapter: devices in rooms through a broker (the embedded one by default)."""

from __future__ import annotations

import argparse
import socket
import sys

from gateway.adapters import Adapter, RunContext, RunRefused, ScopeRoleRouter, is_loopback, warn


class MqttAdapter(Adapter):
    scope_type = "mqtt"  # one scope per device and room
    relay_roles = ("mqtt-out",)  # protocols/mqtt/relay.py ROLE

    def scope_application(self) -> ScopeRoleRouter:
        from protocols.mqtt.consumers import MqttDeviceConsumer

        return ScopeRoleRouter({"device": MqttDeviceConsumer.as_asgi()})

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--mqtt-port", type=int, default=None,
                            help="port of the embedded MQTT broker (default "
                            "MQTT_EMBEDDED_PORT, 1883)")
        parser.add_argument("--no-mqtt", action="store_true", help="leave MQTT out")

    def servers(self, context: RunContext) -> list:
        import aiomqtt
        from django.conf import settings

        from gateway.relay import Relay
        from protocols.mqtt.devices import DeviceKeeper
        from protocols.mqtt.relay import MqttOut
        from protocols.mqtt.server import BrokerAddress, MqttServer

        options, mqtt = context.options, settings.MQTT
        if options.no_mqtt or not mqtt["ENABLED"]:
            return []
        client_id = (mqtt["CLIENT_ID"]
                     or f"rt-gateway-{socket.gethostname()}-{options.port}")[:128]
        services: list = []
        protocol = _protocol(mqtt["PROTOCOL"])
        if mqtt["URL"]:
            address = BrokerAddress.from_url(mqtt["URL"])
        else:
            if protocol != aiomqtt.ProtocolVersion.V311:
                warn("MQTT_PROTOCOL=5 applies to a broker of your own (MQTT_URL): the embedded "
                     "broker speaks MQTT 3.1.1, so devices' MQTT 5 properties (a file's "
                     "content type and name) do not reach the gateway.")
                protocol = aiomqtt.ProtocolVersion.V311
            broker = _embedded_broker(options, client_id)
            if broker is None:
                return []
            services.append(broker)
            # The gateway's own client logs in with this process's credentials (never logged).
            address = BrokerAddress(host=_connect_host(broker.host), port=broker.port,
                                    username=broker.policy.gateway_user,
                                    password=broker.policy.gateway_password)
        server = MqttServer(
            context.application, address=address, prefix=mqtt["TOPIC_PREFIX"],
            client_id=client_id, idle_timeout=mqtt["IDLE_TIMEOUT"],
            keepalive=mqtt["KEEPALIVE"], shared_group=mqtt["SHARED_GROUP"], protocol=protocol,
        )
        # The relay after the server, so it stops first: what it is publishing goes out and
        # every room's position is saved while the broker connection is still there.
        out = MqttOut(server, prefix=mqtt["TOPIC_PREFIX"], idle_timeout=mqtt["IDLE_TIMEOUT"])
        keeper = DeviceKeeper(server, prefix=mqtt["TOPIC_PREFIX"],
                              silence=mqtt["DEVICE_SILENCE"])
        return [*services, server, keeper, Relay(out)]


def _protocol(version: str):
    """MQTT_PROTOCOL: the MQTT version the gateway's client speaks (aiomqtt's enum)."""
    import aiomqtt

    versions = {"3.1.1": aiomqtt.ProtocolVersion.V311, "5": aiomqtt.ProtocolVersion.V5}
    if version not in versions:
        raise RunRefused(f"MQTT_PROTOCOL must be 3.1.1 or 5, not {version[:20]!r}")
    return versions[version]


def _embedded_broker(options: argparse.Namespace, client_id: str):
    """The embedded broker (MQTT_URL empty), or None when its port is taken."""
    from django.conf import settings

    from protocols.mqtt.broker import EmbeddedBroker

    mqtt = settings.MQTT
    host = mqtt["EMBEDDED_HOST"]
    port = options.mqtt_port if options.mqtt_port is not None else mqtt["EMBEDDED_PORT"]
    if options.mqtt_port is None and not _port_free(host, port):
        print(f"MQTT left out: port {port} is taken (another broker?). Use it with "
              f"MQTT_URL=mqtt://127.0.0.1:{port}, or move ours with --mqtt-port.",
              file=sys.stderr, flush=True)
        return None
    if not is_loopback(host):
        warn(f"the embedded MQTT broker listens on {host}:{port}, reachable from other "
             f"machines (MQTT_EMBEDDED_HOST). It is meant for development and small setups; "
             f"anonymous devices are {'ALLOWED' if mqtt['ALLOW_ANONYMOUS'] else 'refused'}. "
             f"For production use Mosquitto with MQTT_URL (deploy/mosquitto).")
    if not mqtt["ALLOW_ANONYMOUS"] and not mqtt["DEVICE_PASSWORDS"]:
        warn("the embedded MQTT broker accepts no device: anonymous clients are refused "
             "(production mode or GATEWAY_REQUIRE_LOGIN=1) and MQTT_DEVICE_PASSWORDS is empty.")
    try:
        return EmbeddedBroker(
            host, port, prefix=mqtt["TOPIC_PREFIX"], gateway_client_id=client_id,
            device_passwords=mqtt["DEVICE_PASSWORDS"], allow_anonymous=mqtt["ALLOW_ANONYMOUS"],
            max_packet_size=mqtt["MAX_PACKET_SIZE"],
        )
    except (OSError, UnicodeDecodeError) as exc:
        raise RunRefused(f"MQTT_DEVICE_PASSWORDS: cannot read it ({exc})") from None


def _connect_host(host: str) -> str:
    """Where this process's own client reaches a broker bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


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

"""The embedded MQTT broker (amqtt), for `gateway run` without MQTT_URL.

It listens itself and hands each connection to amqtt through a reader that follows MQTT's
framing: a packet whose header announces more than ``MQTT_MAX_PACKET_SIZE`` bytes closes the
connection before its body is read (amqtt alone would read any size into memory), and so
does a first packet (CONNECT) that has not come within ``CONNECT_TIMEOUT``. amqtt runs the
protocol with the gateway's logins, topics and acknowledgement chain
(protocols/mqtt/broker_relay.py, protocols/mqtt/broker_auth.py). For a real deployment,
Mosquitto and MQTT_URL (deploy/mosquitto).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from amqtt.adapters import StreamWriterAdapter
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType

from gateway.ratelimit import flood_limit as default_flood_limit
from protocols.mqtt.broker_auth import BrokerPolicy, PasswordFile
from protocols.mqtt.broker_relay import ConnectFailed, GatewayBroker
from protocols.mqtt.broker_stream import PacketLimitReader

logger = logging.getLogger(__name__)

LISTENER = "default"
STOP_TIMEOUT = 10.0  # seconds for amqtt to end its sessions at shutdown


class EmbeddedBroker:
    """The broker on ``host:port``: devices log in with the passwords of ``device_passwords``
    (a mosquitto_passwd file; none: no device accounts) or anonymously if allowed, and the
    gateway's client with ``policy.gateway_user`` and ``policy.gateway_password``, made here,
    random for each process. OSError if the password file cannot be read."""

    def __init__(self, host: str, port: int, *, prefix: str, gateway_client_id: str,
                 device_passwords: str = "", allow_anonymous: bool, max_packet_size: int,
                 flood_limit=default_flood_limit) -> None:
        self.host, self.port = host, port
        self.policy = BrokerPolicy(
            prefix=prefix, gateway_client_id=gateway_client_id,
            gateway_password=secrets.token_urlsafe(32),
            passwords=PasswordFile(device_passwords) if device_passwords else None,
            allow_anonymous=allow_anonymous,
        )
        self.max_packet_size = max_packet_size
        self.flood_limit = flood_limit
        self._broker: GatewayBroker | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        listener = ListenerConfig(type=ListenerType.EXTERNAL, bind=f"{self.host}:{self.port}")
        # Made here: amqtt binds to the running loop.
        self._broker = GatewayBroker(
            BrokerConfig(listeners={LISTENER: listener}, plugins={}),
            policy=self.policy, flood_limit=self.flood_limit,
        )
        await self._broker.start()
        self._server = await asyncio.start_server(self._connected, self.host, self.port)
        logger.info("embedded MQTT broker listening", extra={
            "protocol": "mqtt", "broker": f"mqtt://{self.host}:{self.port}",
            "max_packet_size": self.max_packet_size,
            "allow_anonymous": self.policy.allow_anonymous,
            "device_passwords": str(self.policy.passwords.path) if self.policy.passwords else None,
        })

    async def stop(self) -> None:
        """Stop listening, end every session (bounded: amqtt waits for each client to read
        what was written to it), then drop whatever connection is left."""
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            try:
                await asyncio.wait_for(self._broker.shutdown(), STOP_TIMEOUT)
            except TimeoutError:
                logger.warning("the embedded broker's sessions did not end in time",
                               extra={"protocol": "mqtt"})
        for writer in list(self._writers):
            writer.transport.abort()
        if self._connections:
            _, pending = await asyncio.wait(self._connections, timeout=2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        broker = self._broker
        if broker is None:
            writer.close()
            return
        task = asyncio.current_task()
        if task is None:  # asyncio.start_server runs each connection in a task
            raise RuntimeError("a broker connection outside a task")
        self._connections.add(task)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")

        def refused(reason: str, size: int) -> None:
            broker.refused(reason, "closed a connection", peer=str(peer), size=size,
                           limit=self.max_packet_size)

        stream = PacketLimitReader(reader, writer, limit=self.max_packet_size, on_refused=refused)
        try:
            await broker.external_connected(stream, StreamWriterAdapter(writer), LISTENER)
        except ConnectFailed as failed:
            broker.refused(failed.code, f"refused a connection: {failed.reason}", peer=str(peer),
                           client_id=(failed.client_id or "")[:200],
                           username=(failed.username or "")[:200])
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            writer.close()

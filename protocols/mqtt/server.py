"""The MQTT protocol server: owns the broker connection and the ``mqtt`` scopes.

Like daphne for WebSockets, it knows nothing of rooms: it turns broker traffic into scopes
and events for the root ASGI application, and carries bytes back to the broker. The events
are written down in protocols/mqtt/events.py.

- A device scope per (device, room), ``{"type": "mqtt", "role": "device", ...}``, opened
  on the device's first message and fed ``mqtt.message`` events (``mqtt.file`` for what it
  publishes on its ``/file`` topic, with the MQTT 5 properties); closed (``mqtt.disconnect``)
  after ``MQTT_IDLE_TIMEOUT`` without a message, and at shutdown. Its error replies
  (``mqtt.publish``) wait in a bounded outbox.
- ``publish(topic, payload, properties=)`` for the relay (protocols/mqtt/relay.py: each
  room's messages on ``<prefix>/<room>/out``, from the process holding the ``mqtt-out``
  lease) and for commands to devices (protocols/mqtt/devices.py).
- Devices' status and state (``<prefix>/+/status/+``, ``<prefix>/+/state/+``, retained ones
  too) go to ``device_reports`` (protocols/mqtt/devices.py), not to a scope: they are the
  room's view of the device, not messages; answers to commands
  (``<prefix>/+/cmd/+/reply``) go to the device's scope as ``mqtt.reply``.
- Its own status, retained on ``gateway/status/<client id>``: ``online`` once connected,
  ``offline`` as its will and when it stops.

One connection, QoS 1 both ways, a fixed client id with clean session off (the broker keeps
what devices publish while the gateway is away), reconnects with exponential backoff and
jitter. A publish waits out an unreachable broker, and one that the connection's end cut
short is published again on the next. Inbound, with several gateway processes, each
subscribes through a shared subscription (``MQTT_SHARED_GROUP``), so each device message
reaches one of them. MQTT 3.1.1, or MQTT 5 when asked (``MQTT_PROTOCOL=5``: the same
sessions, said with Clean Start and a Session Expiry Interval); only then do devices'
properties (a file's content type and name) reach the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import metrics, status
from gateway.errors import GatewayError
from gateway.lease import jitter
from protocols.mqtt import wire as topics
from protocols.mqtt.events import (
    DeviceReceive,
    DeviceSend,
    MqttDisconnect,
    MqttFile,
    MqttHandled,
    MqttMessage,
    MqttReply,
    mqtt_connect,
    mqtt_disconnect,
)
from protocols.scopes import Scope, ScopeRegistry, scope_open, scopes_cancel, scopes_close

logger = logging.getLogger(__name__)

IDLE_CHECK_INTERVAL = 2.0  # seconds between looks for idle device scopes
# Error replies waiting for the broker; past it they are dropped (counted), so an absent
# broker costs bounded memory. (The relay's messages wait in the log, not here.)
OUTBOX_LIMIT = 1_000
PUBLISH_RETRY = 0.5  # seconds before a publish refused on a live connection is tried again
SESSION_KEPT = 0xFFFFFFFF  # MQTT 5 Session Expiry Interval: never (3.1.1's clean session off)
SCOPE_STOP_WAIT = 5.0  # seconds scopes get to finish at a stop before they are cancelled


class ServerStopped(Exception):
    """A publish asked of a server that has stopped."""


@dataclass
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"MQTT_URL must be mqtt://host:port or mqtts://host:port: {url!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )

    def __str__(self) -> str:  # never the password
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class _Link:
    """One broker connection; ``lost`` is set when it ends."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.lost = asyncio.Event()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      properties: Properties | None = None) -> bool:
        """True once the broker has confirmed it (QoS 1); False if this connection ended
        first (aiomqtt would wait out its timeout on a dead connection); MqttError if the
        broker refused it or did not confirm it in time."""
        if self.lost.is_set():
            return False
        sending = asyncio.ensure_future(self.client.publish(
            topic, payload, qos=1, retain=retain, properties=properties))
        ending = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait((sending, ending), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sending, ending):
                if not task.done():
                    task.cancel()
        if sending.done() and not sending.cancelled():
            sending.result()  # raises what the publish failed with
            return True
        return False


class MqttServer:
    def __init__(
        self,
        application,
        *,
        address: BrokerAddress,
        prefix: str,
        client_id: str,
        idle_timeout: float,
        keepalive: int = 30,
        shared_group: str = "",
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V311,
    ) -> None:
        self.application = application
        self.address = address
        self.prefix = prefix
        self.client_id = client_id
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.shared_group = shared_group
        self.protocol = protocol
        self.devices: ScopeRegistry[tuple[str, str], Scope[DeviceReceive]] = ScopeRegistry()
        # Error replies to devices: (topic, payload)
        self.outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=OUTBOX_LIMIT)
        self.connected = asyncio.Event()  # set and cleared only with the connection itself
        self.stats = {"received": 0, "stored": 0, "published": 0, "rejected": 0,
                      "reconnects": 0, "dropped": 0}
        self.refused: Counter[str] = Counter()  # device messages refused, by error code
        self._link: _Link | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        # Received messages not yet acknowledged: token -> (scope, connection, mid, qos)
        self._acks: dict[int, tuple[Scope[DeviceReceive] | None, _Link, int, int]] = {}
        self._token = 0
        # Devices' status and state (protocols/mqtt/devices.py takes them), as received:
        # (topic, payload, retained).
        self.device_reports: Callable[[topics.DeviceTopic, bytes, bool], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def status(self) -> dict:
        """For /readyz and the dashboard."""
        return {"ready": self.connected.is_set(), "broker": str(self.address),
                "outbox": self.outbox.qsize(), **self.stats}

    async def start(self) -> None:
        status.register("mqtt", self.status)
        self._housekeeping = asyncio.create_task(self._idle_loop(), name="mqtt-idle")
        self._tasks = [
            asyncio.create_task(self._connection_loop(), name="mqtt-connection"),
            asyncio.create_task(self._publish_loop(), name="mqtt-publish"),
            self._housekeeping,
        ]

    async def stop(self) -> None:
        """Close every scope, publish the error replies already queued (briefly), then
        disconnect; a publish still waiting ends with ``ServerStopped``.

        A device message still waiting to be stored (the database down) is left
        unacknowledged: the broker delivers it again to the next connection.
        """
        self._stopping = True
        status.unregister("mqtt")
        self._housekeeping.cancel()
        await asyncio.gather(self._housekeeping, return_exceptions=True)
        scopes = self.devices.values()
        await scopes_close(scopes, mqtt_disconnect("shutdown"), wait=SCOPE_STOP_WAIT)
        await scopes_cancel(scopes)
        self.devices.take_all()
        if self.connected.is_set():
            try:
                await asyncio.wait_for(self.outbox.join(), timeout=3)
            except TimeoutError:
                logger.warning("stopped with %d MQTT error replies unpublished",
                               self.outbox.qsize(), extra={"protocol": "mqtt"})
            await self._gateway_status(topics.OFFLINE)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        logger.info("mqtt server stopped",
                    extra={"protocol": "mqtt", **self.stats, "refused": dict(self.refused)})

    # --- the broker connection ---------------------------------------------------------

    async def _connection_loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with self._connect() as client:
                    await self._subscribe(client)
                    backoff = 0.5
                    link = _Link(client)
                    birth = asyncio.create_task(self._birth(link), name="mqtt-birth")
                    try:
                        await self._serve(link)
                    finally:
                        birth.cancel()
            except aiomqtt.MqttError as exc:
                self.stats["reconnects"] += 1
                delay = jitter(backoff)
                logger.warning("MQTT broker unreachable (%s); retrying in %.1fs", exc, delay,
                               extra={"protocol": "mqtt", "broker": str(self.address)})
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)

    async def _serve(self, link: _Link) -> None:
        """Take the connection's messages until it ends; it is the current one meanwhile."""
        self._link = link
        self.connected.set()
        logger.info("connected to the MQTT broker",
                    extra={"protocol": "mqtt", "broker": str(self.address)})
        try:
            async for message in link.client.messages:
                self._on_message(message, link)
        finally:
            # Only a connection's own end clears the state: never a newer connection's.
            link.lost.set()
            if self._link is link:
                self._link = None
                self.connected.clear()

    @property
    def in_filters(self) -> list[str]:
        """What the gateway reads: devices' messages, their files and their answers to
        commands (each by one process, with a shared subscription), and their status and
        state (by every process: a shared subscription gets no retained messages, and every
        process keeps the devices' last ones to take over their writing)."""
        plain = [topics.in_filter(self.prefix), topics.in_file_filter(self.prefix),
                 topics.reply_filter(self.prefix)]
        if self.shared_group:
            plain = [f"$share/{self.shared_group}/{item}" for item in plain]
        return [*plain, topics.status_filter(self.prefix), topics.state_filter(self.prefix)]

    @property
    def status_topic(self) -> str:
        """Where this process says it is online (retained; ``offline`` is its will)."""
        return topics.gateway_status_topic(self.client_id)

    async def _birth(self, link: _Link) -> None:
        """Say this process is online, retained (its will says offline)."""
        try:
            await link.publish(self.status_topic, topics.ONLINE.encode(), retain=True)
        except aiomqtt.MqttError as exc:
            logger.warning("could not publish the gateway's status (%s)", exc,
                           extra={"protocol": "mqtt", "topic": self.status_topic})

    async def _gateway_status(self, status: str) -> None:
        link = self._link
        if link is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await link.publish(self.status_topic, status.encode(), retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            logger.warning("could not publish the gateway's status (%s)", exc,
                           extra={"protocol": "mqtt", "topic": self.status_topic})

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        """Subscribe to ``in_filters`` (one SUBSCRIBE). A filter the broker refuses is logged
        and the others still serve: an ACL without the file topic (deploy/mosquitto/acl), on
        a broker that checks it at subscribe time (Mosquitto grants it, then delivers
        nothing)."""
        filters = self.in_filters
        granted = await client.subscribe([(item, 1) for item in filters])
        for item, code in zip(filters, granted, strict=False):
            value = getattr(code, "value", code)  # paho's ReasonCode, or an int
            if isinstance(value, int) and value >= 0x80:
                logger.error("the MQTT broker refused the subscription to %s (code %#x): check "
                             "its ACL for the gateway's user", item, value,
                             extra={"protocol": "mqtt", "broker": str(self.address)})

    def _connect(self) -> aiomqtt.Client:
        tls = aiomqtt.TLSParameters(cert_reqs=ssl.CERT_REQUIRED) if self.address.tls else None
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self.address.username,
            password=self.address.password,
            identifier=self.client_id,
            keepalive=self.keepalive,
            tls_params=tls,
            protocol=self.protocol,
            will=aiomqtt.Will(self.status_topic, topics.OFFLINE.encode(), qos=1, retain=True),
            **self._session(),
        )
        # Acknowledge a device's message only once it is stored (or refused), so one that
        # arrives as the gateway dies is delivered again. aiomqtt does not expose paho's
        # manual acknowledgements; its paho client does.
        client._client.manual_ack_set(True)  # noqa: SLF001
        return client

    def _session(self) -> dict:
        """Alone, a persistent session: the broker keeps what devices publish while the
        gateway is away. Sharing a subscription, a clean one: a persistent session of a
        replica that died would go on taking its share of the devices' messages (the broker
        queues them for it), while a clean one ends with the connection and the live replicas
        get everything. MQTT 5 says so with Clean Start and the Session Expiry Interval
        (aiomqtt's default, a clean start on each new client, would drop the session)."""
        clean = bool(self.shared_group)
        if self.protocol != aiomqtt.ProtocolVersion.V5:
            return {"clean_session": clean}
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if clean else SESSION_KEPT
        return {"clean_start": clean, "properties": properties}

    def _ack(self, token: int) -> None:
        """Acknowledge a received message (on the connection it came on; after a reconnect
        the broker sends it again, which the client_id or the store makes harmless)."""
        entry = self._acks.pop(token, None)
        if entry is None:
            return
        scope, link, mid, qos = entry
        if scope is not None:
            scope.pending -= 1
        if link is self._link and qos > 0:
            link.client._client.ack(mid, qos)  # noqa: SLF001

    async def _publish_loop(self) -> None:
        while True:
            topic, payload = await self.outbox.get()
            try:
                await self.publish(topic, payload)
            except ServerStopped:
                pass
            finally:
                self.outbox.task_done()

    @property
    def mqtt5(self) -> bool:
        """Whether the connection speaks MQTT 5 (properties go with what it publishes)."""
        return self.protocol == aiomqtt.ProtocolVersion.V5

    async def publish(self, topic: str, payload: bytes, *,
                      properties: Properties | None = None) -> None:
        """Publish until the broker confirms it, on whatever connection is current: in the
        order asked, never skipped (QoS 1: a message cut short may reach subscribers twice).
        ``ServerStopped`` once the server stops. ``properties`` (MQTT 5) only when
        ``mqtt5``."""
        while True:
            while (link := self._link) is None:
                if self._stopping:
                    raise ServerStopped("the MQTT server has stopped")
                await self._connection_change()
            try:
                if await link.publish(topic, payload, properties=properties):
                    self.stats["published"] += 1
                    return
            except aiomqtt.MqttError as exc:
                # The connection may still be up (a timeout, a refusal): only the
                # connection loop decides it is down, so readiness stays true to it.
                logger.warning("MQTT publish failed (%s); trying again", exc,
                               extra={"protocol": "mqtt", "topic": topic[:200]})
                await asyncio.sleep(PUBLISH_RETRY)

    async def _connection_change(self) -> None:
        """Wait for a connection (or, at most a second, for the server to stop)."""
        try:
            async with asyncio.timeout(1.0):
                await self.connected.wait()
        except TimeoutError:
            pass

    # --- inbound -----------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message, link: _Link) -> None:
        """Hand a device's message to its scope, which reports it handled with its token;
        anything else is acknowledged at once."""
        token = self._token = self._token + 1
        self._acks[token] = (None, link, message.mid, message.qos)
        topic = str(message.topic)
        try:
            device = topics.device_topic_parse(self.prefix, topic)
        except GatewayError as exc:
            self._refused(topic, exc)
            return self._ack(token)
        if device is not None and device.kind != topics.REPLY:
            # A status or a state, live or retained (replayed on subscribe: the truth now).
            if self.device_reports is not None:
                self.device_reports(device, bytes(message.payload), bool(message.retain))
            return self._ack(token)
        if message.retain:
            # Replayed by the broker on (re)subscribe: already stored when it was live.
            logger.info("ignored a retained message", extra={"protocol": "mqtt", "topic": topic})
            return self._ack(token)
        try:
            where = device or topics.in_topic_parse(self.prefix, topic)
        except GatewayError as exc:
            self._refused(topic, exc)
            return self._ack(token)
        self.stats["received"] += 1
        scope = self.devices.open((where.device_id, where.room), lambda: self._open_device(
            {"type": "mqtt", "role": "device", "room": where.room,
             "device_id": where.device_id, "prefix": self.prefix},
            name=f"mqtt-device-{where.device_id}-{where.room}",
        ))
        now = scope.last_seen = time.monotonic()
        scope.pending += 1
        self._acks[token] = (scope, link, message.mid, message.qos)
        # Stamped with its arrival: the device's rate counts from here, not from when its
        # turn to be stored comes (the database may be slow).
        event: MqttMessage | MqttFile | MqttReply
        if isinstance(where, topics.DeviceTopic):  # an answer to a command
            event = {"type": "mqtt.reply", "payload": bytes(message.payload), "ack": token,
                     "received_at": now,
                     "correlation_data": topics.correlation_data(message.properties)}
        elif where.file:
            content_type, user_properties = topics.message_properties(message.properties)
            event = {"type": "mqtt.file", "payload": bytes(message.payload), "ack": token,
                     "received_at": now, "content_type": content_type,
                     "user_properties": user_properties}
        else:
            event = {"type": "mqtt.message", "payload": bytes(message.payload), "ack": token,
                     "received_at": now}
        scope.put(event)

    def _refused(self, topic: str, exc: GatewayError) -> None:
        self.stats["rejected"] += 1
        metrics.refused("mqtt", exc.code)
        logger.warning("refused MQTT message: %s", exc.detail,
                       extra={"protocol": "mqtt", "topic": topic[:200], "code": exc.code})

    def error_reply(self, topic: str, payload: bytes, code: str) -> None:
        """Queue an error reply to a device (dropped, counted, when the outbox is full)."""
        self.refused[code] += 1
        try:
            self.outbox.put_nowait((topic, payload))
        except asyncio.QueueFull:
            self.stats["dropped"] += 1
            metrics.dropped("mqtt", "error_replies")
            if self.stats["dropped"] % 1000 == 1:  # the first, then one line a thousand
                logger.warning("MQTT outbox full: dropped %d error replies so far",
                               self.stats["dropped"], extra={"protocol": "mqtt"})

    def _open_device(self, scope: dict, *, name: str) -> Scope[DeviceReceive]:
        return scope_open(self.application, scope, self._send, first=mqtt_connect(),
                          name=name, on_exit=self._exited)

    def _exited(self, opened: Scope[MqttDisconnect], failure: BaseException | None) -> None:
        scope = opened.scope
        self.devices.ended((scope["device_id"], scope["room"]), opened)
        unhandled = [token for token, entry in self._acks.items() if entry[0] is opened]
        for token in unhandled:
            if failure is not None and not self._stopping:
                # It failed on them (a bug, logged): acknowledged, so that a message it
                # cannot handle does not hold one of the broker's in-flight slots for good.
                self._ack(token)
            else:
                # Cancelled while storing (a stop): unacknowledged, the broker sends it again.
                del self._acks[token]

    async def _send(self, message: DeviceSend) -> None:
        if message["type"] == "mqtt.handled":
            return self._handled(message)
        if message["type"] != "mqtt.publish":
            raise ValueError(f"unknown mqtt event {message['type']!r}")
        self.error_reply(message["topic"], message["payload"], message["refused"])

    def _handled(self, message: MqttHandled) -> None:
        """A device's message is stored or refused: acknowledge it (a stored one reaches the
        relay through its commit)."""
        self._ack(message["ack"])
        if message["stored"]:
            self.stats["stored"] += 1

    # --- idle scopes ---------------------------------------------------------------------

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(min(IDLE_CHECK_INTERVAL, self.idle_timeout / 2))
            self._close_idle()

    def _close_idle(self) -> None:
        """Close the device scopes idle for ``idle_timeout`` once they have handled all they
        received."""
        for key, scope in self.devices.idle(self.idle_timeout):
            self.devices.ended(key, scope)  # a new message opens a new scope at once
            scope.close(mqtt_disconnect("idle"))

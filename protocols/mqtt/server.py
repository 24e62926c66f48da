"""The MQTT protocol server: owns the broker connection and the ``mqtt`` scopes.

Like daphne for WebSockets, it knows nothing of rooms: it turns broker traffic into scopes
and events for the root ASGI application, and carries the application's ``mqtt.publish``
events back to the broker. The events are written down in protocols/mqtt/events.py.

- A device scope per (device, room), ``{"type": "mqtt", "role": "device", ...}``, opened
  on the device's first message and fed ``mqtt.message`` events; closed (``mqtt.disconnect``)
  after ``MQTT_IDLE_TIMEOUT`` without a message, and at shutdown.
- A room scope per room with something to publish, ``{"type": "mqtt", "role": "out", ...}``,
  whose consumer publishes each room message once on ``<prefix>/<room>/out``. It closes after
  ``MQTT_IDLE_TIMEOUT`` without a message (an idle room costs no subscription); the
  housekeeping scan (one query every ``ROOM_SCAN_INTERVAL``) opens it again, where it got,
  once the room has newer messages, and a device's stored message opens it at once. A room
  created after the server started is relayed from its first message. With several gateway
  processes on one broker, only the holder of the ``mqtt-out`` lease relays (so each message
  is published once); it records how far it got per room, and a process that takes the
  lease over (within ``LEASE_TTL``) resumes there. Inbound, each process subscribes through
  a shared subscription (``MQTT_SHARED_GROUP``), so each device message reaches one.

One connection, QoS 1 both ways, a fixed client id with clean session off (the broker keeps
what devices publish while the gateway is away), reconnects with exponential backoff and
jitter. Outbound messages wait in order (at most ``OUTBOX_LIMIT``) while the broker is
unreachable; a publish that the connection's end cut short is published again on the next.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomqtt
from channels.db import database_sync_to_async

from gateway import metrics, selectors, services, status
from gateway.errors import GatewayError
from gateway.lease import Lease, jitter
from protocols.mqtt import wire as topics
from protocols.mqtt.events import (
    DeviceReceive,
    MqttDisconnect,
    MqttHandled,
    MqttRoomPublish,
    RelayReceive,
    ScopeSend,
    mqtt_connect,
    mqtt_disconnect,
)
from protocols.scopes import Scope, ScopeRegistry, scope_open, scopes_cancel, scopes_close

logger = logging.getLogger(__name__)

Outgoing = tuple[str | None, bytes, str | None, int | None]

ROOM_SCAN_INTERVAL = 2.0
RELAY = "mqtt-out"  # the lease and cursor name of the rooms -> MQTT relay
LEASE_TTL = 10.0
# Messages waiting for the broker. Past it a room's relay pauses (and later resumes where
# it got) and error replies are dropped (counted), so an absent broker costs bounded memory.
OUTBOX_LIMIT = 10_000
PUBLISH_RETRY = 0.5  # seconds before a publish refused on a live connection is tried again
NEW_ROOM_SAVE_DELAY = 0.2  # new rooms' cursors are saved together, this soon
SCOPE_STOP_WAIT = 5.0  # seconds scopes get to finish at a stop before they are cancelled


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

    async def publish(self, topic: str, payload: bytes) -> bool:
        """True once the broker has confirmed it (QoS 1); False if this connection ended
        first (aiomqtt would wait out its timeout on a dead connection); MqttError if the
        broker refused it or did not confirm it in time."""
        if self.lost.is_set():
            return False
        sending = asyncio.ensure_future(self.client.publish(topic, payload, qos=1))
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
    ) -> None:
        self.application = application
        self.address = address
        self.prefix = prefix
        self.client_id = client_id
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.shared_group = shared_group
        self.lease = Lease(RELAY, ttl=LEASE_TTL)
        self.leader = False
        # While relaying, per room: the newest id handed to the outbox (where a closed relay
        # starts again), the newest the broker confirmed, and the newest recorded for the
        # next holder of the lease (RelayCursor).
        self.queued: dict[str, int] = {}
        self.published: dict[str, int] = {}
        self._saved: dict[str, int] = {}
        self._paused: set[str] = set()  # rooms whose relay stopped on a full outbox
        self._new_rooms = asyncio.Event()  # a room's first relay: save its cursor soon
        self.devices: ScopeRegistry[tuple[str, str], Scope[DeviceReceive]] = ScopeRegistry()
        self.relays: ScopeRegistry[str, Scope[RelayReceive]] = ScopeRegistry()
        # (topic, payload, room, cursor); topic None: only the room's position moves
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=OUTBOX_LIMIT)
        self.connected = asyncio.Event()  # set and cleared only with the connection itself
        self.stats = {"received": 0, "published": 0, "rejected": 0, "reconnects": 0,
                      "dropped": 0, "relay_pauses": 0}
        self.refused: Counter[str] = Counter()  # device messages refused, by error code
        self._link: _Link | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        # Received messages not yet acknowledged: token -> (scope, connection, mid, qos)
        self._acks: dict[int, tuple[Scope[DeviceReceive] | None, _Link, int, int]] = {}
        self._token = 0

    # --- lifecycle ---------------------------------------------------------------------

    def status(self) -> dict:
        """For /readyz and the dashboard."""
        return {"ready": self.connected.is_set(), "broker": str(self.address),
                "relaying": self.leader, "relays": len(self.relays),
                "outbox": self.outbox.qsize(), **self.stats}

    async def start(self) -> None:
        status.register("mqtt", self.status)
        await self._lead()  # before any device message: see _relays_start
        self._housekeeping = asyncio.create_task(
            self._housekeeping_loop(), name="mqtt-housekeeping"
        )
        self._tasks = [
            asyncio.create_task(self._connection_loop(), name="mqtt-connection"),
            asyncio.create_task(self._publish_loop(), name="mqtt-publish"),
            self._housekeeping,
        ]

    async def stop(self) -> None:
        """Close every scope, publish what is already queued (briefly), then disconnect.

        A device message still waiting to be stored (the database down) is left
        unacknowledged: the broker delivers it again to the next connection.
        """
        self._stopping = True
        status.unregister("mqtt")
        # No more lease renewals or new relays from here.
        self._housekeeping.cancel()
        await asyncio.gather(self._housekeeping, return_exceptions=True)
        scopes: list[Scope[MqttDisconnect]] = [*self.devices.values(), *self.relays.values()]
        await scopes_close(scopes, mqtt_disconnect(), wait=SCOPE_STOP_WAIT)
        await scopes_cancel(scopes)
        self.devices.take_all()
        self.relays.take_all()
        if self.connected.is_set():
            try:
                await asyncio.wait_for(self.outbox.join(), timeout=3)
            except TimeoutError:
                logger.warning("stopped with %d MQTT messages unpublished", self.outbox.qsize(),
                               extra={"protocol": "mqtt"})
        if self.leader:  # hand over: the next holder resumes where we stopped
            await self._save_cursors()
            await self.lease.release()
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
                    await client.subscribe(self.in_filter, qos=1)
                    backoff = 0.5
                    await self._serve(_Link(client))
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
    def in_filter(self) -> str:
        plain = topics.in_filter(self.prefix)
        return f"$share/{self.shared_group}/{plain}" if self.shared_group else plain

    def _connect(self) -> aiomqtt.Client:
        tls = aiomqtt.TLSParameters(cert_reqs=ssl.CERT_REQUIRED) if self.address.tls else None
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self.address.username,
            password=self.address.password,
            identifier=self.client_id,
            # Alone, a persistent session: the broker keeps what devices publish while the
            # gateway is away. Sharing a subscription, a clean one: a persistent session of
            # a replica that died would go on taking its share of the devices' messages
            # (the broker queues them for it), while a clean one ends with the connection
            # and the live replicas get everything.
            clean_session=bool(self.shared_group),
            keepalive=self.keepalive,
            tls_params=tls,
        )
        # Acknowledge a device's message only once it is stored (or refused), so one that
        # arrives as the gateway dies is delivered again. aiomqtt does not expose paho's
        # manual acknowledgements; its paho client does.
        client._client.manual_ack_set(True)  # noqa: SLF001
        return client

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
            topic, payload, room, seq = await self.outbox.get()
            if topic is not None:  # None: only a position (a log entry with nothing to publish)
                await self._publish(topic, payload)
                self.stats["published"] += 1
            if room is not None and seq is not None:
                self.published[room] = max(seq, self.published.get(room, 0))
            self.outbox.task_done()

    async def _publish(self, topic: str, payload: bytes) -> None:
        """Publish until the broker confirms it, on whatever connection is current: kept in
        order, never skipped (QoS 1: a message cut short may reach subscribers twice)."""
        while True:
            while (link := self._link) is None:
                await self.connected.wait()
            try:
                if await link.publish(topic, payload):
                    return
            except aiomqtt.MqttError as exc:
                # The connection may still be up (a timeout, a refusal): only the
                # connection loop decides it is down, so readiness stays true to it.
                logger.warning("MQTT publish failed (%s); trying again", exc,
                               extra={"protocol": "mqtt", "topic": topic[:200]})
                await asyncio.sleep(PUBLISH_RETRY)

    # --- inbound -----------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message, link: _Link) -> None:
        """Hand a device's message to its scope, which reports it handled with its token;
        anything else is acknowledged at once."""
        token = self._token = self._token + 1
        self._acks[token] = (None, link, message.mid, message.qos)
        topic = str(message.topic)
        if message.retain:
            # Replayed by the broker on (re)subscribe: already stored when it was live.
            logger.info("ignored a retained message", extra={"protocol": "mqtt", "topic": topic})
            return self._ack(token)
        try:
            where = topics.in_topic_parse(self.prefix, topic)
        except GatewayError as exc:
            self.stats["rejected"] += 1
            metrics.refused("mqtt", exc.code)
            logger.warning("refused MQTT message: %s", exc.detail,
                           extra={"protocol": "mqtt", "topic": topic[:200], "code": exc.code})
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
        scope.put({"type": "mqtt.message", "payload": bytes(message.payload), "ack": token,
                   "received_at": now})

    def _open_device(self, scope: dict, *, name: str) -> Scope[DeviceReceive]:
        return scope_open(self.application, scope, self._send, first=mqtt_connect(),
                          name=name, on_exit=self._exited)

    def _open_relay(self, scope: dict, *, name: str) -> Scope[RelayReceive]:
        return scope_open(self.application, scope, self._send, first=mqtt_connect(),
                          name=name, on_exit=self._exited)

    def _exited(self, opened: Scope[MqttDisconnect], failure: BaseException | None) -> None:
        scope = opened.scope
        if scope["role"] != "device":
            if self.relays.ended(scope["room"], opened):
                # The scan opens it again where it got once the room has something new.
                self._paused.discard(scope["room"])
            return
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

    async def _send(self, message: ScopeSend) -> None:
        if message["type"] == "mqtt.handled":
            return self._handled(message)
        if message["type"] != "mqtt.publish":
            raise ValueError(f"unknown mqtt event {message['type']!r}")
        if "room" in message:  # a room's entry; else a device's error reply
            return self._relay_publish(message)
        self.refused[message["refused"]] += 1
        # Error replies take at most half the outbox, so they never pause a room's relay.
        if self.outbox.qsize() < max(1, self.outbox.maxsize // 2):
            self.outbox.put_nowait((message["topic"], message["payload"], None, None))
        else:
            self.stats["dropped"] += 1
            if self.stats["dropped"] % 1000 == 1:  # the first, then one line a thousand
                logger.warning("MQTT outbox full: dropped %d error replies so far",
                               self.stats["dropped"], extra={"protocol": "mqtt"})

    def _handled(self, message: MqttHandled) -> None:
        """A device's message is stored or refused: acknowledge it; a stored one wakes its
        room's relay."""
        entry = self._acks.get(message["ack"])
        self._ack(message["ack"])
        if entry is not None and entry[0] is not None and message["stored"] and self.leader:
            room = entry[0].scope["room"]
            if room not in self.relays and self.outbox.qsize() < OUTBOX_LIMIT // 2:
                self._relay(room, after=self.queued.get(room, 0))

    def _relay_publish(self, message: MqttRoomPublish) -> None:
        """Queue a relay's message; on a full outbox, stop the relay instead (it starts
        again from the last message queued once the broker has caught up)."""
        room = message["room"]
        if room in self._paused:
            return
        relay = self.relays.get(room)
        if self.outbox.full():
            self._paused.add(room)
            self.stats["relay_pauses"] += 1
            if relay is not None:
                relay.close(mqtt_disconnect())
            logger.warning("MQTT outbox full: the room's relay pauses",
                           extra={"protocol": "mqtt", "room": room,
                                  "resume_after": self.queued.get(room, 0)})
            return
        self.outbox.put_nowait((message["topic"], message["payload"], room, message["id"]))
        self.queued[room] = max(message["id"], self.queued.get(room, 0))
        if relay is not None:
            relay.last_seen = time.monotonic()

    # --- relays, rooms and idle scopes -------------------------------------------------

    def _relay(self, room: str, *, after: int) -> None:
        """Open the room's relay, publishing what follows ``after``."""
        if room in self.relays:
            return
        self.queued[room] = max(after, self.queued.get(room, 0))
        if room not in self._saved and room not in self.published:
            # A room never recorded: where it starts counts as published, saved at once,
            # so a process taking over never starts it from "now" (which would skip what
            # was never published).
            self.published[room] = after
            self._new_rooms.set()
        self.relays.open(room, lambda: self._open_relay(
            {"type": "mqtt", "role": "out", "room": room, "prefix": self.prefix,
             "after": after},
            name=f"mqtt-out-{room}",
        ))

    async def _housekeeping_loop(self) -> None:
        while True:
            await self._guarded(self._housekeeping_round)
            # Until the next round, save the cursors of new rooms as they come.
            deadline = time.monotonic() + min(ROOM_SCAN_INTERVAL, self.idle_timeout / 2)
            while (left := deadline - time.monotonic()) > 0:
                self._new_rooms.clear()
                try:
                    await asyncio.wait_for(self._new_rooms.wait(), left)
                except TimeoutError:
                    break
                await asyncio.sleep(NEW_ROOM_SAVE_DELAY)  # the rooms created together
                await self._guarded(self._save_cursors)

    async def _guarded(self, step) -> None:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("mqtt housekeeping failed; will retry", extra={"protocol": "mqtt"})

    async def _housekeeping_round(self) -> None:
        await self._lead()
        if self.leader:
            await self._save_cursors()
            await self._scan_rooms()
        self._close_idle()

    async def _lead(self) -> None:
        """Take or renew the relay lease; start or stop relaying accordingly."""
        held = await self.lease.renew()
        if held and not self.leader:
            self.leader = True
            await self._relays_start()
        elif not held and self.leader:
            self.leader = False
            for relay in self.relays.values():
                relay.close(mqtt_disconnect())
            self.queued, self.published, self._saved = {}, {}, {}
            self._paused.clear()
            logger.warning("lost the MQTT relay lease; another process relays now",
                           extra={"protocol": "mqtt"})

    async def _relays_start(self) -> None:
        """Where the previous holder stopped: relays for the rooms it left behind only (a
        restart with thousands of idle rooms opens none). Run before the connection, so
        the first device message finds the positions known."""
        cursors = await database_sync_to_async(selectors.relay_cursors)(relay=RELAY)
        rooms = await database_sync_to_async(selectors.room_positions)()
        self.queued, self.published, self._saved = dict(cursors), dict(cursors), dict(cursors)
        behind = 0
        for _, room, last_seq in rooms:
            if room not in cursors:
                if last_seq:  # never relayed (MQTT was off): from now, recorded as such
                    self.queued[room] = self.published[room] = last_seq
            elif last_seq > cursors[room]:
                self._relay(room, after=cursors[room])
                behind += 1
        logger.info("relaying rooms to MQTT",
                    extra={"protocol": "mqtt", "rooms": len(rooms), "behind": behind})

    async def _scan_rooms(self) -> None:
        """Open the relays of the rooms with messages beyond what was queued for them: new
        rooms from their first message, idle or failed ones from where they got."""
        if self.outbox.qsize() >= OUTBOX_LIMIT // 2:
            return  # the broker is behind: relays wait until it has caught up
        behind = await database_sync_to_async(selectors.relay_rooms_behind)(relay=RELAY)
        for room, last_seq in behind:
            after = self.queued.get(room, 0)
            if room not in self.relays and last_seq > after:
                self._relay(room, after=after)

    async def _save_cursors(self) -> None:
        if not self.leader:
            return
        changed = {r: s for r, s in self.published.items() if self._saved.get(r) != s}
        if changed:
            await database_sync_to_async(services.relay_cursors_save)(
                relay=RELAY, positions=changed
            )
            self._saved.update(changed)

    def _close_idle(self) -> None:
        """Close the scopes idle for ``idle_timeout``: a device's once it has handled all it
        received, a relay's (its room costs nothing until the scan finds news)."""
        for key, scope in self.devices.idle(self.idle_timeout):
            self.devices.ended(key, scope)  # a new message opens a new scope at once
            scope.close(mqtt_disconnect())
        for _, relay in self.relays.idle(self.idle_timeout):
            relay.close(mqtt_disconnect())  # forgotten when it has ended

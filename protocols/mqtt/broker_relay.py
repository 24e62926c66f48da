"""amqtt's broker with the gateway's rules: a device's message is acknowledged only once the
gateway has stored it, clients log in before any session is touched, and each may use only
its topics (protocols/mqtt/broker_auth.py).

amqtt acknowledges a QoS 1 PUBLISH as soon as it has read it. Here a device's message on
``<prefix>/<room>/in/<device>`` (or a file on its ``/file`` topic) goes straight to the
gateway's own client instead (the only reader of those topics), and the device's PUBACK
(PUBREC for QoS 2) is sent only when the gateway's client has acknowledged its copy, which
it does once the message is stored (protocols/mqtt/server.py, manual acks). So a kill -9 of
the process loses nothing a device was told was received: the chain of acknowledgements ends
in the database. If the gateway's client is not there (starting, reconnecting) the message
waits ``GATEWAY_WAIT``; if it is not taken by then, the device's connection is closed
unacknowledged and the device sends it again when it reconnects (as MQTT devices do). Once
taken, it waits ``ACK_TIMEOUT`` for the gateway's acknowledgement, then closes the device's
connection so it sends the message again.
Every other topic keeps amqtt's own handling.

Each device connection has the flood limit of every protocol (gateway/ratelimit.py), so
rotating device ids on one connection does not multiply it. Past it a QoS 1/2 message is
held, unacknowledged, until the limit lets it through, in order (at most ``MAX_PENDING``
per connection): a flood is slowed to the limit by the device's own in-flight window, and a
backlog a device sends after the gateway was away is taken at the limit's pace, not lost.
A QoS 0 message past the limit is dropped, with a ``rate_limited`` error on its error topic
and a sampled log line.

Written against amqtt 0.12, whose hooks it overrides: ``handle_publish`` and
``handle_pubrel`` of a connection's handler, the broker's ``_initialize_client_session``
(amqtt looks up, and may take over or delete, a session before it authenticates: here the
login comes first) and ``_authenticate``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter

from amqtt.broker import Broker
from amqtt.errors import AMQTTError, ProtocolHandlerError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from gateway import metrics
from gateway.errors import GatewayError
from gateway.ratelimit import TokenBucket
from protocols.mqtt import wire as topics
from protocols.mqtt.broker_auth import (
    BrokerPolicy,
    Client,
    LoginRefused,
    shared_filter_strip,
    topic_matches,
)
from protocols.mqtt.broker_stream import PROTOCOL_LIMIT, PacketLimitReader

logger = logging.getLogger(__name__)

GATEWAY_WAIT = 30.0  # seconds a device's message waits for the gateway's client to be there
# How long a device's message waits for the gateway's acknowledgement (its disconnect settles
# a copy at once); past it the device is closed and sends the message again. A database
# outage longer than this can store a message without a client_id twice.
ACK_TIMEOUT = 60.0
MAX_PENDING = 100  # a connection's messages waiting for the gateway; past it, it is closed
ERROR_INTERVAL = 1.0  # at most one rate_limited error a second to a connection
HELD_SLACK = 1.0  # a message the gateway took longer than this to take held its device back
CLIENT = "gateway.client"  # session attribute: the Client it logged in as
QOS2_HELD = "gateway.qos2"  # session attribute: QoS 2 ids acknowledged (PUBREC), no PUBREL yet
GATEWAY_FILTERS = "gateway.filters"  # the gateway session's subscriptions, without $share


class ConnectFailed(Exception):
    """A connection that never became a session: ``code`` invalid_connect or
    login_refused, ``reason`` for the log."""

    def __init__(self, code: str, reason: str, *, client_id: str | None = None,
                 username: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason
        self.client_id, self.username = client_id, username


class LogSample:
    """At most one log line per reason every ``interval`` seconds, which counts what it
    left out, so a client repeating a refused action cannot fill the disk."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def take(self, reason: str) -> int | None:
        """None: do not log this one. Otherwise log it, with this many left out before."""
        now = time.monotonic()
        if now < self._next.get(reason, 0.0):
            self._skipped[reason] += 1
            return None
        self._next[reason] = now + self.interval
        return self._skipped.pop(reason, 0)


class GatewayBroker(Broker):
    """amqtt's broker, with the policy's logins and topics and the acknowledgement chain."""

    def __init__(self, config, *, policy: BrokerPolicy, flood_limit) -> None:
        super().__init__(config)
        self.policy = policy
        self.flood_limit = flood_limit  # () -> TokenBucket, one per device connection
        self.sample = LogSample()
        self._gateway_event = asyncio.Event()

    # --- logins: before any session is looked up ---------------------------------------

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
        try:
            handler, incoming = await ClientHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except Exception as exc:  # noqa: BLE001 - whatever an untrusted first packet breaks
            raise ConnectFailed("invalid_connect", f"invalid CONNECT: {exc!r}"[:300]) from None
        try:
            client = await asyncio.to_thread(
                self.policy.authenticate, incoming.client_id, incoming.username,
                incoming.password,
            )
            if incoming.will_flag and not self.policy.may_publish(client, incoming.will_topic):
                raise LoginRefused("its will topic is not allowed")
            session, _ = self._sessions.get(incoming.client_id, (None, None))
            if (session is not None and session.attributes.get(CLIENT) != client
                    and session.transitions.is_connected()):
                # amqtt would orphan that connection; nobody takes another's session over.
                raise LoginRefused("its client id is in use by another client",
                                   IDENTIFIER_REJECTED)
        except LoginRefused as refused:
            await ConnackPacket.build(0, refused.code).to_stream(writer)
            raise ConnectFailed("login_refused", refused.reason, client_id=incoming.client_id,
                                username=incoming.username) from None
        if client.is_gateway and isinstance(reader, PacketLimitReader):
            # Its room messages are as long as the gateway allows; MQTT_MAX_PACKET_SIZE is
            # for what devices send.
            reader.limit = PROTOCOL_LIMIT
        handler.bind(self, client)
        return handler, await self._session_for(incoming, client)

    async def _session_for(self, incoming: Session, client: Client) -> Session:
        """amqtt's session lookup, except that a session is resumed only by the client it
        belongs to (anyone else starts afresh)."""
        existing = self._sessions.get(incoming.client_id) if incoming.client_id else None
        if existing is not None and (incoming.clean_session
                                     or existing[0].attributes.get(CLIENT) != client):
            await self._delete_session(incoming.client_id)
            existing = None
        if not incoming.client_id:
            incoming.client_id = gen_client_id()
        session = incoming
        session.parent = 0
        if existing is not None:
            session = existing[0]
            session.parent = 1
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain",
                         "keep_alive", "username", "password"):
                setattr(session, name, getattr(incoming, name))
        session.attributes[CLIENT] = client
        # amqtt keeps nothing for an anonymous session once it disconnects.
        session.is_anonymous = client.is_anonymous
        return session

    async def _authenticate(self, session: Session, _listener) -> bool:
        return CLIENT in session.attributes  # decided in _initialize_client_session

    # --- subscriptions ------------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        client = session.attributes.get(CLIENT)
        topic_filter = subscription[0]
        if client is not None and not self.policy.may_subscribe(client, topic_filter):
            self.refused("subscribe_denied", "refused a subscription", client_id=session.client_id,
                         client=str(client), topic=topic_filter[:200])
            return 0x80
        granted = await super().add_subscription(subscription, session)
        if client is not None and client.is_gateway and granted != 0x80:
            session.attributes.setdefault(GATEWAY_FILTERS, set()).add(
                shared_filter_strip(topic_filter)
            )
            self.gateway_changed()
        return granted

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Retained messages for one of the session's own subscriptions only: amqtt offers a
        client that connects those of every client's filters (it would be sent the devices'
        status and state that the gateway reads, whatever it may subscribe to)."""
        held = self._subscriptions.get(subscription[0], ())
        if any(owner.client_id == session.client_id for owner, _ in held):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    # --- the gateway's client -----------------------------------------------------------

    def gateway_changed(self) -> None:
        """Wake the messages waiting for the gateway's client to be there."""
        self._gateway_event.set()
        self._gateway_event = asyncio.Event()

    def _gateway_for(self, topic: str) -> ClientHandler | None:
        """The gateway's connection, if it is up and reads ``topic``."""
        session, handler = self._sessions.get(self.policy.gateway_client_id, (None, None))
        if session is None or not isinstance(handler, ClientHandler) or not handler.serving:
            return None
        filters = session.attributes.get(GATEWAY_FILTERS, ())
        return handler if any(topic_matches(f, topic) for f in filters) else None

    async def relay(self, topic: str, data: bytes, qos: int) -> bool:
        """Hand a device's message to the gateway's client; whether it acknowledged it
        (QoS 0: whether it was sent)."""
        deadline = time.monotonic() + GATEWAY_WAIT
        while (gateway := self._gateway_for(topic)) is None:
            event, remaining = self._gateway_event, deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return False
        acked = await gateway.forward(topic, data, qos)
        if acked is None:
            return False
        await asyncio.wait({acked}, timeout=ACK_TIMEOUT)  # never cancels ``acked``
        return acked.done() and not acked.cancelled()

    def refused(self, code: str, what: str, **extra) -> None:
        """Count a refusal; log it, sampled."""
        metrics.refused("mqtt", code)
        skipped = self.sample.take(code)
        if skipped is not None:
            logger.warning("embedded broker %s", what,
                           extra={"protocol": "mqtt", "code": code, "unlogged": skipped, **extra})


class ClientHandler(BrokerProtocolHandler):
    """One client connection, as amqtt's handler, with the gateway's handling of PUBLISH."""

    broker: GatewayBroker
    client: Client
    serving = False  # started and not stopped: the gateway's client can take messages

    def bind(self, broker: GatewayBroker, client: Client) -> None:
        self.broker, self.client = broker, client
        self.bucket: TokenBucket = broker.flood_limit()
        self.pending = 0
        self._admitting = asyncio.Lock()
        self._error_at = 0.0
        self._allowance = 0.0  # messages allowed past the bucket, given back by ``_held``
        self._allowance_until = 0.0
        self._held_until = 0.0

    async def start(self) -> None:
        await super().start()
        self.serving = True
        if self.client.is_gateway:
            self.broker.gateway_changed()

    async def stop(self) -> None:
        # Before amqtt cancels the waiters: no new ones from here (see ``forward``).
        self.serving = False
        await super().stop()

    # --- what a client publishes --------------------------------------------------------

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """A device's message goes to the gateway (acknowledged once the gateway has it);
        what the client may not publish is dropped; the rest is amqtt's."""
        topic, qos = publish_packet.topic_name, publish_packet.qos
        if qos not in (QOS_0, QOS_1, QOS_2):
            return self._close()  # a protocol violation
        if not self.broker.policy.may_publish(self.client, topic):
            self._refuse("publish_denied", "refused a publish", topic)
            return await self._acknowledge(publish_packet)  # as Mosquitto: dropped, acked
        if self.client.is_gateway or not self.broker.policy.is_device_topic(topic):
            return await super().handle_publish(publish_packet)
        if qos == QOS_0 and not self._admit():
            self._refuse("rate_limited", "dropped a device message over the flood limit", topic)
            return await self._rate_limited(topic)
        await self._relay(publish_packet)

    async def _relay(self, packet: PublishPacket) -> None:
        """Acknowledge a device's message once the gateway has; else close the connection
        unacknowledged, so the device sends it again."""
        if packet.qos == QOS_2 and packet.packet_id in self._qos2_held():
            return await self._acknowledge(packet)  # a repeat of one already taken
        if self.pending >= MAX_PENDING:
            self.broker.refused("too_many_pending", "closed a connection with too many "
                                "unacknowledged messages", client_id=self._client_id())
            return self._close()
        self.pending += 1
        try:
            if packet.qos != QOS_0:
                await self._admission()
            since = time.monotonic()
            taken = await self.broker.relay(packet.topic_name, bytes(packet.data or b""),
                                            packet.qos)
        finally:
            self.pending -= 1
        if taken:
            self._held(since)
            return await self._acknowledge(packet)
        if packet.qos == QOS_0:  # at most once: nothing to send again
            return self.broker.refused("not_taken", "dropped a QoS 0 device message: the "
                                       "gateway's client is not there", client_id=self._client_id())
        self.broker.refused("not_taken", "closed a device connection: the gateway did not take "
                            "its message in time (the device sends it again)",
                            client_id=self._client_id())
        self._close()

    async def _admission(self) -> None:
        """Wait until the flood limit lets this message through; in arrival order (the lock
        serves its waiters first come, first served)."""
        async with self._admitting:
            # The bucket refills with time: there is no event to wait for.
            while not self._admit():  # noqa: ASYNC110
                await asyncio.sleep(max(self.bucket.retry_after(), 0.005))

    def _admit(self) -> bool:
        """The connection's flood limit, counted as messages arrive."""
        if self.bucket.allow():
            return True
        if self._allowance >= 1.0 and time.monotonic() < self._allowance_until:
            self._allowance -= 1.0
            return True
        return False

    def _held(self, since: float) -> None:
        """The gateway took a message sent at ``since`` only now. If that was long (a store
        stalled), the device held back what it had to send meanwhile and sends it all at
        once now: give that time back to the limit (once per stretch), for as long again."""
        now = time.monotonic()
        if now - since <= HELD_SLACK:
            return
        span = now - max(since, self._held_until)
        if span > 0:
            if now >= self._allowance_until:
                self._allowance = 0.0
            self._allowance += span * self.bucket.rate
            self._allowance_until = max(self._allowance_until, now + span)
            self._held_until = now

    def _close(self) -> None:
        """End the connection as a lost one: its reader stops, amqtt cleans up (this task,
        one of the reader's, ends with it)."""
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _acknowledge(self, packet: PublishPacket) -> None:
        if packet.qos == QOS_1:
            await self._send_packet(PubackPacket.build(packet.packet_id))
        elif packet.qos == QOS_2:
            self._qos2_held().add(packet.packet_id)
            await self._send_packet(PubrecPacket.build(packet.packet_id))

    async def handle_pubrel(self, pubrel: PubrelPacket) -> None:
        if pubrel.packet_id in self._pubrel_waiters:
            return await super().handle_pubrel(pubrel)  # amqtt's own QoS 2 flow
        # One of ours; and an unknown id is answered too (MQTT-4.3.3), so the client
        # does not hold it forever.
        self._qos2_held().discard(pubrel.packet_id)
        await self._send_packet(PubcompPacket.build(pubrel.packet_id))

    def _qos2_held(self) -> set[int]:
        if self.session is None:  # detached: nothing to remember
            return set()
        return self.session.attributes.setdefault(QOS2_HELD, set())

    async def _rate_limited(self, topic: str) -> None:
        """Tell the device on its error topic (at most once a second), as the gateway does."""
        now = time.monotonic()
        if now - self._error_at < ERROR_INTERVAL:
            return
        self._error_at = now
        try:
            where = topics.in_topic_parse(self.broker.policy.prefix, topic)
        except GatewayError:
            return
        await self.broker.internal_message_broadcast(
            topics.error_topic(self.broker.policy.prefix, where.room, where.device_id),
            topics.error_payload("rate_limited", "too many messages from this connection"),
            QOS_1,
        )

    def _refuse(self, code: str, what: str, topic: str | None) -> None:
        self.broker.refused(code, what, client_id=self._client_id(), client=str(self.client),
                            topic=(topic or "")[:200])

    def _client_id(self) -> str | None:
        return self.session.client_id if self.session is not None else None

    # --- the gateway's connection: device messages handed to it ---------------------------

    async def forward(self, topic: str, data: bytes, qos: int) -> asyncio.Future | None:
        """Publish a device's message to this (the gateway's) connection at QoS 1 (0 for
        QoS 0); a future done once it is acknowledged, None if it cannot be sent now."""
        if not self.serving or self.session is None:
            return None
        acked: asyncio.Future = self._loop.create_future()
        if qos == QOS_0:
            packet = PublishPacket.build(topic, data, None, False, QOS_0, False)
            acked.set_result(None)
        else:
            try:
                packet_id = self.session.next_packet_id
            except AMQTTError:  # 65535 messages unacknowledged
                return None
            message = OutgoingApplicationMessage(packet_id, topic, QOS_1, data, False)
            packet = message.publish_packet = message.build_publish_packet()
            # The id stays taken until the gateway answers it or its connection ends (amqtt
            # cancels the waiters then): a late PUBACK must never acknowledge another message.
            self.session.inflight_out[packet_id] = message
            self._puback_waiters[packet_id] = acked
            acked.add_done_callback(functools.partial(self._settled, packet_id, message))
        # Written whatever happens to the device's task (shielded): once its id is on the
        # wire, only the gateway's answer or the end of its connection may free it.
        sent = asyncio.ensure_future(self._send_packet(packet))
        _SENDING.add(sent)
        sent.add_done_callback(_SENDING.discard)
        sent.add_done_callback(functools.partial(_cancel_unless_sent, acked))
        try:
            await asyncio.shield(sent)
        except (OSError, AMQTTError, ProtocolHandlerError):
            return None
        return acked

    def _settled(self, packet_id: int, message: OutgoingApplicationMessage, acked) -> None:
        if self._puback_waiters.get(packet_id) is acked:
            del self._puback_waiters[packet_id]
        if self.session is not None and self.session.inflight_out.get(packet_id) is message:
            del self.session.inflight_out[packet_id]


_SENDING: set[asyncio.Future] = set()  # shielded sends, referenced until done


def _cancel_unless_sent(acked: asyncio.Future, sent: asyncio.Future) -> None:
    if sent.cancelled() or sent.exception() is not None:
        acked.cancel()

"""MQTT's consumer: a device posting into a room.

The protocol server (protocols/mqtt/server.py) opens the scopes; the consumer translates
between its ``mqtt.*`` events (protocols/mqtt/events.py) and the room. (A room's messages
reach ``<prefix>/<room>/out`` through the relay: protocols/mqtt/relay.py.)

A file (``mqtt.file``) is checked and kept by ``files.attachments_store`` in a thread of
``FILE_THREADS`` (Pillow and the storage must not hold up the event loop, nor the database
thread every other store of the process waits for), then posted as a message carrying it,
through the same group commit as text.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.db import DatabaseError, InterfaceError, OperationalError

from consumers.base import RoomConsumer
from gateway import devices, events, files, metrics, services
from gateway.errors import GatewayError
from gateway.ingest import Busy, message_post
from gateway.logging import LogSampler
from gateway.names import display_name_clean
from gateway.ratelimit import TokenBucket, flood_limit
from gateway.services import Post
from protocols.mqtt import wire as topics
from protocols.mqtt.events import (
    DeviceSend,
    MqttConnect,
    MqttDisconnect,
    MqttFile,
    MqttMessage,
    MqttReply,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
Received = TypeVar("Received", MqttMessage, MqttFile, MqttReply)

SEEN_INTERVAL = 60.0  # how often a device's last_seen is written while it is active
RETRY_FIRST, RETRY_MAX = 0.5, 5.0  # backoff (seconds) while the database cannot store
STALL = 1.0  # seconds: a store that took longer gives its time back to the device's rate
LOGGED_PER_CODE = 5  # refusals logged per code and device scope; the rest counted
ERROR_REPLY_BURST = 10  # error replies to a device at once (then one a second)
# Threads checking and keeping devices' files (Pillow, the storage, one row each), shared by
# the process's devices: they bound the CPU files take and the database connections these
# threads keep (closed once older than CONN_MAX_AGE, as channels does around every call).
FILE_THREADS = 2
_file_threads = ThreadPoolExecutor(max_workers=FILE_THREADS, thread_name_prefix="mqtt-files")


class MqttDeviceConsumer(RoomConsumer):
    """One device in one room: what it publishes on ``<prefix>/<room>/in/<device>`` (and
    its files, on ``.../in/<device>/file``)."""

    protocol = "mqtt"
    base_send: Callable[[DeviceSend], Awaitable[None]]  # the scope's send, typed

    async def mqtt_connect(self, message: MqttConnect) -> None:
        self.device_id = self.scope["device_id"]
        self.prefix = self.scope["prefix"]
        self.bucket = flood_limit()
        # Error replies: a burst of 10, then one a second; the rest only counted.
        self.replies = TokenBucket(rate=1.0, burst=ERROR_REPLY_BURST)
        self.log_sample = LogSampler(LOGGED_PER_CODE)
        self.seen_at = 0.0
        self.posted = False  # it has said something: it is in the room (notices)
        self.client_id: object = None  # of the message being handled, for its error reply
        try:
            shown = await database_sync_to_async(services.display_name_for)(
                sender_id=self.device_id, protocol=self.protocol, name=self.device_id
            )
            await self.room_join(
                self.scope["room"], member_id=self.device_id, name=shown, listen=False
            )
        except Exception:
            # Presence is all a device needs the runtime for: keep taking its messages.
            self.room = self.scope["room"]
            logger.warning("device not shown in presence (runtime unavailable)",
                           extra=self.log_extra(), exc_info=True)

    async def mqtt_message(self, message: MqttMessage) -> None:
        await self._received(message, self._message)

    async def mqtt_file(self, message: MqttFile) -> None:
        await self._received(message, self._file)

    async def mqtt_reply(self, message: MqttReply) -> None:
        await self._received(message, self._reply)

    async def _received(self, message: Received,
                        handle: Callable[[Received], Awaitable[bool]]) -> None:
        """Handle what the device published (``handle``: stored, or GatewayError), answer
        a refusal on its error topic, and report it handled."""
        self.client_id, stored = None, False
        try:
            # Every message spends the limit, a refused one too; counted when it reached the
            # gateway: time it waited here is not the device's.
            if not self.bucket.allow(now=message.get("received_at")):
                raise GatewayError("rate_limited", "too many messages from this device")
            started = time.monotonic()
            stored = await handle(message)
            self._stalled(time.monotonic() - started)
        except GatewayError as exc:
            await self._refuse(exc.code, exc.detail, self.client_id)
        except DatabaseError:
            logger.exception("could not store a device message", extra=self.log_extra())
            await self._refuse("unavailable", "the message could not be stored", self.client_id)
        # Stored or refused: the server may acknowledge it to the broker now.
        await self.base_send({"type": "mqtt.handled", "ack": message["ack"], "stored": stored})

    async def _message(self, message: MqttMessage) -> bool:
        """A message (text or JSON), or a change to one: whether it was stored now."""
        payload = topics.payload_decode(message["payload"])
        self.client_id = payload.client_id
        sender = await self._sender(payload.name)
        if payload.kind == "message":
            _, stored = await self._post(payload.text, sender, payload.client_id,
                                         payload.reply_to)
            return stored
        return await self._change(payload, sender)

    async def _file(self, message: MqttFile) -> bool:
        """A file, kept and posted as a message carrying it (with its caption): whether it
        was stored now (a repeat of its client_id is not; the core then lets the file go)."""
        meta = topics.file_decode(message["content_type"], message["user_properties"])
        self.client_id = meta.client_id
        sender = await self._sender(None)
        upload = files.Upload.of_bytes(message["payload"], name=meta.name,
                                       declared_type=meta.content_type)
        kept = await self._kept(upload, sender)
        _, stored = await self._post(meta.caption or "", sender, meta.client_id, meta.reply_to,
                                     attachments=tuple(kept))
        return stored

    async def _reply(self, message: MqttReply) -> bool:
        """The device's answer to a command: its reply to the command's message, once
        (whether it was stored now: a late or repeated answer is not, and is only logged)."""
        key, reply = topics.reply_decode(message["payload"], message["correlation_data"])
        await self._seen()
        answer = database_sync_to_async(devices.command_answer)
        event = await self._stored(lambda: answer(
            room=self.scope["room"], device_id=self.device_id, key=key, reply=reply))
        return event is not None

    async def _kept(self, upload: files.Upload,
                    sender: events.Sender) -> list[events.Attachment]:
        """The file checked and kept (pending until its message is stored): FileRefused, a
        GatewayError, for a file the gateway does not take; waits out a database that cannot
        take it now, as a message does. A storage that fails is ``unavailable``."""
        keep = database_sync_to_async(files.attachments_store, thread_sensitive=False,
                                      executor=_file_threads)
        try:
            return await self._stored(lambda: keep(room=self.scope["room"], sender=sender,
                                                   uploads=[upload]))
        except (GatewayError, DatabaseError):
            raise
        except Exception as exc:
            logger.exception("could not keep a device's file", extra=self.log_extra())
            raise GatewayError("unavailable", "the file could not be stored") from exc

    async def _sender(self, name: str | None) -> events.Sender:
        """The device as the room shows it (``name``, else its id); on its first message,
        it is in the room now (announced if the room's policy asks)."""
        await self._seen()
        shown = display_name_clean(name or "") or self.device_id
        sender = events.sender(protocol=self.protocol, id=self.device_id, name=shown)
        if not self.posted:
            self.posted = True
            await self._notice(joined=True)
        return sender

    async def _change(self, payload: topics.DevicePayload, sender: events.Sender) -> bool:
        """An edit or delete of one of its own messages, or a reaction: the room's next log
        entry (GatewayError if refused); whether it was recorded now."""
        change = database_sync_to_async(services.message_change)
        _, created = await self._stored(lambda: change(
            payload.kind, room=self.scope["room"], id=payload.id, sender=sender,
            origin=self.scope_id, staff=False, client_id=payload.client_id, text=payload.text,
            emoji=payload.emoji, added=payload.added))
        return created

    async def _post(self, text: object, sender: events.Sender, client_id: object,
                    reply_to: object = None, attachments: tuple[events.Attachment, ...] = (),
                    ) -> tuple[events.RoomMessage, bool]:
        """Store the message (with whatever else arrives meanwhile: gateway/ingest.py)."""
        return await self._stored(lambda: message_post(Post(
            room=self.scope["room"], text=text, sender=sender, origin=self.scope_id,
            client_id=client_id, reply_to=reply_to, attachments=attachments,
        )))

    async def _stored(self, store: Callable[[], Awaitable[T]]) -> T:
        """Run ``store`` until the database takes it, waiting out a database that cannot
        now (locked, unreachable, or too busy to queue it): unacknowledged meanwhile, and
        the device's next messages wait behind it. A stop cancels the wait and leaves it to
        the broker to deliver again."""
        delay, attempt = RETRY_FIRST, 0
        while True:
            try:
                return await store()
            except (OperationalError, InterfaceError, Busy) as exc:
                attempt += 1
                wait = delay * (0.5 + random.random())  # noqa: S311 (spread, not secret)
                if attempt & (attempt - 1) == 0:  # attempts 1, 2, 4, 8...: an outage logs little
                    logger.warning("could not store a device message (%s); attempt %d, "
                                   "retrying in %.1fs", exc, attempt, wait,
                                   extra=self.log_extra(code="unavailable"))
                await asyncio.sleep(wait)
                delay = min(delay * 2, RETRY_MAX)

    def _stalled(self, seconds: float) -> None:
        """A store that stalled (the database locked or down) is the gateway's delay, not
        the device's: the broker held back what the device sent meanwhile (its in-flight
        window to us was full) and hands it over in one burst now, which the time given
        back lets through. A normal store (milliseconds) gives nothing back, so a flood
        gains nothing from its own load."""
        if seconds >= STALL:
            self.bucket.credit(seconds)

    async def _seen(self) -> None:
        """Record that the device is active (at most every SEEN_INTERVAL); not needed to
        store its message, so a failure here only logs."""
        if time.monotonic() - self.seen_at <= SEEN_INTERVAL:
            return
        self.seen_at = time.monotonic()
        try:
            await database_sync_to_async(services.device_seen)(
                device_id=self.device_id, protocol=self.protocol, room=self.room
            )
        except DatabaseError:
            logger.warning("could not record the device as seen", extra=self.log_extra(),
                           exc_info=True)

    async def _refuse(self, code: str, detail: str, client_id: object) -> None:
        metrics.refused(self.protocol, code)
        if self.log_sample.allow(code):
            more = " (more are counted, not logged)" if self.log_sample.last_logged(code) else ""
            logger.warning("refused device message %s: %s%s", code, detail, more,
                           extra=self.log_extra(code=code))
        if not self.replies.allow():
            return
        await self.base_send({
            "type": "mqtt.publish",
            "topic": topics.error_topic(self.prefix, self.scope["room"], self.device_id),
            "payload": topics.error_payload(code, detail, client_id),
            "refused": code,  # counted by the server
        })

    async def finish(self) -> None:
        counted = getattr(self, "log_sample", None) and self.log_sample.counted()
        if counted:
            logger.warning("device messages refused but not logged: %s", counted,
                           extra=self.log_extra(counted=counted))
        await super().finish()

    async def mqtt_disconnect(self, message: MqttDisconnect) -> None:
        if message["reason"] == "idle" and self.posted:
            await self._notice(joined=False)
        raise StopConsumer()

    async def _notice(self, *, joined: bool) -> None:
        """Tell the room the device came or went, if its policy asks (a failure only
        logs: the device's messages matter more)."""
        sender = events.sender(protocol=self.protocol, id=self.device_id, name=self.device_id)
        try:
            await database_sync_to_async(services.room_member_notice)(
                room=self.scope["room"], member=sender, joined=joined, origin=self.scope_id)
        except (GatewayError, DatabaseError) as exc:
            logger.warning("could not post the device's notice: %s", exc,
                           extra=self.log_extra(joined=joined))

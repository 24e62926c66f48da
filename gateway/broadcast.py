"""The one choke point for room traffic: the only caller of ``group_send`` for rooms.

Services call ``room_event_broadcast_on_commit`` inside the transaction that stores the
message, so nobody hears about a message that was not stored. When the process runs a
gateway runtime, committed events are handed to its ``Publisher`` without blocking the
database thread (one task publishes them in commit order); elsewhere (a management
command, a test without a runtime) they are published synchronously.

The publisher takes what has queued since its last round trip (up to ``PUBLISH_BATCH``) and
publishes it in one: a Redis pipeline on channels-redis's pub/sub layer
(``_pipeline_publish``), one ``group_send`` after another on any other layer. Its queue is
bounded (``PUBLISH_BACKLOG``): past it an event is dropped and counted, never blocking a
store. A dropped log entry is still delivered, from the log, by every hub's resync; a
dropped control event (a staff disconnect) is lost, with a log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.db import transaction

from gateway import metrics
from gateway.events import (
    CONTROL_GROUP,
    ROOM_DEVICE,
    ROOM_ENTRY,
    ROOM_MESSAGE,
    ROOM_PRESENCE,
    LogEntry,
)
from gateway.names import room_group_name

logger = logging.getLogger(__name__)

PUBLISH_BACKLOG = 10_000  # committed events waiting for the layer, per process
PUBLISH_BATCH = 500  # events published by one round trip to the layer
# A round trip that takes longer is given up (and retried once): a connection left
# half-open by a Redis restart must not hold every later event behind it.
PUBLISH_TIMEOUT = 5.0
# A room's live events outside its log: who is here, a device's status and state.
LIVE_ONLY = (ROOM_PRESENCE, ROOM_DEVICE)


async def room_event_broadcast(event: LogEntry) -> None:
    """Send a stored log entry (a message, a delete...) to every process serving the room.

    A failure is logged, not raised: the message is stored, and every process fills the gap
    from the database on its next resync (gateway/fanout.py).
    """
    await _group_send(room_group_name(event["room"]), event)


async def control_broadcast(event: Mapping[str, Any]) -> None:
    """Send a control event (gateway/events.py) to every process."""
    await _group_send(CONTROL_GROUP, event)


async def _group_send(group: str, event: Mapping[str, Any]) -> None:
    await _group_send_many([(group, event)])


async def _group_send_many(sends: list[tuple[str, Mapping[str, Any]]]) -> None:
    """``group_send`` each (group, event), in order, in as few round trips as the layer
    allows. A failure is retried once (the first publish after a Redis restart fails on a
    stale pooled connection; the retry gets a fresh one: a receiver drops what it had twice),
    then logged. Each attempt is bounded by ``PUBLISH_TIMEOUT``."""
    layer = get_channel_layer()
    done = 0  # sent one by one so far (a retry goes on from there)
    for attempt in (1, 2):
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                if not await _pipeline_publish(layer, sends):
                    for group, event in sends[done:]:
                        await layer.group_send(group, event)
                        done += 1
            return
        except Exception:
            if attempt == 1:
                logger.warning("broadcast failed; retrying once",
                               extra={"group": sends[0][0], "count": len(sends),
                                      "protocol": "layer"})
                continue
            first = sends[0][1]
            logger.exception(
                "broadcast failed; receivers will resync from history",
                extra={"group": sends[0][0], "type": first["type"], "id": first.get("id"),
                       "count": len(sends), "protocol": "layer"},
            )


async def _pipeline_publish(layer, sends: list[tuple[str, Mapping[str, Any]]]) -> bool:
    """Publish ``sends`` through channels-redis's pub/sub layer in one pipelined round trip
    per Redis shard, as its ``group_send`` would one by one (the same channel names, the same
    serializer, the shard's own connection, under its lock). False when the layer is not one
    (the caller sends one by one). A group maps to one shard, so a room's order is kept.

    It relies on the layer's internals (``_get_layer``, ``_get_group_channel_name``,
    ``_get_shard`` and the shard's ``_lock``, ``_ensure_redis`` and ``_redis``) of
    channels-redis 4.x, pinned in pyproject.toml; tests/test_broadcast.py fails if they move.
    """
    if not isinstance(layer, RedisPubSubChannelLayer):
        return False
    loop_layer = layer._get_layer()
    by_shard: dict[Any, list[tuple[str, bytes]]] = {}
    for group, event in sends:
        channel = loop_layer._get_group_channel_name(group)
        by_shard.setdefault(loop_layer._get_shard(channel), []).append(
            (channel, layer.serialize(event))
        )
    for shard, messages in by_shard.items():
        async with shard._lock:
            shard._ensure_redis()
            pipe = shard._redis.pipeline(transaction=False)
            for channel, data in messages:
                pipe.publish(channel, data)
            await pipe.execute()
    return True


class Publisher:
    """Publishes committed events from any thread, in order, on the runtime's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue(maxsize=PUBLISH_BACKLOG)
        self.task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        self.task = self.loop.create_task(self._run(), name="gateway-publisher")

    async def stop(self) -> None:
        """Publish what is queued, then stop."""
        await self.queue.join()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def submit(self, event: Mapping[str, Any]) -> None:
        """Queue an event; safe from any thread, never blocks."""
        self.loop.call_soon_threadsafe(self._put, (event,))

    def submit_many(self, events: list[Mapping[str, Any]]) -> None:
        """Queue events committed together, in order, with one wake-up of the loop."""
        self.loop.call_soon_threadsafe(self._put, events)

    def _put(self, events: tuple[Mapping[str, Any], ...] | list[Mapping[str, Any]]) -> None:
        for event in events:
            for listener in tuple(_committed_listeners) if event["type"] not in LIVE_ONLY else ():
                try:
                    listener(event)
                except Exception:
                    logger.exception("a listener of committed events failed")
            try:
                self.queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1
                metrics.dropped("layer", "publish_backlog")
                if self.dropped % 1000 == 1:  # the first, then a line a thousand
                    logger.warning("publish backlog full: dropped %d events so far (log "
                                   "entries still arrive through the resync)", self.dropped,
                                   extra={"protocol": "layer", "type": event.get("type"),
                                          "room": event.get("room")})

    async def _run(self) -> None:
        """Publish whatever has queued since the last round trip, in one (up to
        ``PUBLISH_BATCH``): a lone event goes at once, batches form under load."""
        while True:
            batch = [await self.queue.get()]
            while len(batch) < PUBLISH_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await _group_send_many([(_group_of(event), event) for event in batch])
            finally:
                for _ in batch:
                    self.queue.task_done()


_publisher: Publisher | None = None
# Told of each event committed in this process, on the publisher's loop (the relay follows
# a room as soon as something is stored in it here).
_committed_listeners: list[Callable[[Mapping[str, Any]], None]] = []


def committed_listen(listener: Callable[[Mapping[str, Any]], None]) -> None:
    _committed_listeners.append(listener)


def committed_unlisten(listener: Callable[[Mapping[str, Any]], None]) -> None:
    if listener in _committed_listeners:
        _committed_listeners.remove(listener)


def publisher_install(publisher: Publisher | None) -> None:
    global _publisher
    _publisher = publisher


def _group_of(event: Mapping[str, Any]) -> str:
    if event["type"] in (ROOM_MESSAGE, ROOM_ENTRY, *LIVE_ONLY):
        return room_group_name(event["room"])
    return CONTROL_GROUP


async def _broadcast(events: list[Mapping[str, Any]]) -> None:
    await _group_send_many([(_group_of(event), event) for event in events])


def _publish(events: list[Mapping[str, Any]]) -> None:
    publisher = _publisher
    if publisher is not None and not publisher.loop.is_closed():
        publisher.submit_many(events)
    else:
        async_to_sync(_broadcast)(events)


def presence_broadcast(events: list[Mapping[str, Any]]) -> None:
    """Send presence changes (``room.presence``) to every process serving their rooms, with
    the committed events (on the loop of the process's publisher; dropped when there is
    none: presence is live only)."""
    publisher = _publisher
    if publisher is not None and events:
        publisher.submit_many(events)


def live_broadcast_on_commit(event: Mapping[str, Any]) -> None:
    """Send a room's live event (``room.device``) to every process serving the room once
    the current transaction commits (a state others may read from the database first)."""
    transaction.on_commit(lambda: _publish([event]))


def room_events_broadcast_on_commit(events: list[Mapping[str, Any]]) -> None:
    """Broadcast room events once the current transaction commits, in this order (a batch
    stored together: one commit hook)."""
    if events:
        transaction.on_commit(lambda: _publish(events))


def room_event_broadcast_on_commit(event: Mapping[str, Any]) -> None:
    """Broadcast a room or control event once the current transaction commits (in commit
    order with every other)."""
    transaction.on_commit(lambda: _publish([event]))

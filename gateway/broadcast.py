"""The one choke point for room traffic: the only caller of ``group_send`` for rooms.

Services call ``room_event_broadcast_on_commit`` inside the transaction that stores the
message, so nobody hears about a message that was not stored. When the process runs a
gateway runtime, committed events are handed to its ``Publisher`` without blocking the
database thread (one task publishes them in commit order); elsewhere (a management
command, a test without a runtime) they are published synchronously.

The publisher's queue is bounded (``PUBLISH_BACKLOG``): past it an event is dropped and
counted, never blocking a store. A dropped log entry is still delivered, from the log, by
every hub's resync; a dropped control event (a staff disconnect) is lost, with a log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from gateway import metrics
from gateway.events import CONTROL_GROUP, ROOM_ENTRY, ROOM_MESSAGE, LogEntry
from gateway.names import room_group_name

logger = logging.getLogger(__name__)

PUBLISH_BACKLOG = 10_000  # committed events waiting for the layer, per process


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
    layer = get_channel_layer()
    try:
        await layer.group_send(group, event)
        return
    except Exception:
        # The first publish after a Redis restart fails on a stale pooled connection;
        # one retry gets a fresh one.
        logger.warning("broadcast failed; retrying once", extra={"group": group})
    try:
        await layer.group_send(group, event)
    except Exception:
        logger.exception(
            "broadcast failed; receivers will resync from history",
            extra={"group": group, "type": event["type"], "id": event.get("id"),
                   "protocol": "layer"},
        )


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
        self.loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: Mapping[str, Any]) -> None:
        for listener in tuple(_committed_listeners):
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
                logger.warning("publish backlog full: dropped %d events so far (log entries "
                               "still arrive through the resync)", self.dropped,
                               extra={"protocol": "layer", "type": event.get("type"),
                                      "room": event.get("room")})

    async def _run(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                await _broadcast(event)
            finally:
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


async def _broadcast(event: Mapping[str, Any]) -> None:
    if event["type"] in (ROOM_MESSAGE, ROOM_ENTRY):
        await room_event_broadcast(event)  # type: ignore[arg-type]
    else:
        await control_broadcast(event)


def _publish(event: Mapping[str, Any]) -> None:
    publisher = _publisher
    if publisher is not None and not publisher.loop.is_closed():
        publisher.submit(event)
    else:
        async_to_sync(_broadcast)(event)


def room_events_broadcast_on_commit(events: list[Mapping[str, Any]]) -> None:
    """Broadcast room events once the current transaction commits, in this order (a batch
    stored together: one commit hook)."""
    def publish_all() -> None:
        for event in events:
            _publish(event)

    if events:
        transaction.on_commit(publish_all)


def room_event_broadcast_on_commit(event: Mapping[str, Any]) -> None:
    """Broadcast a room or control event once the current transaction commits (in commit
    order with every other)."""
    transaction.on_commit(lambda: _publish(event))

"""Fan-out: one channel-layer subscription per process and room, shared by its members.

The Channels tutorial joins every consumer to the room group, so a room message crosses the
layer once per member, is JSON-encoded once per member and costs a thread hop per member
(``AsyncConsumer.dispatch``). Here each process has one hub: it joins the room group once
per room it serves, receives each event once, and hands the same ``Delivery`` to every local
subscriber, which encodes its wire format once per message through ``Delivery.frame``.

The hub also owns ordering and completeness. A room's log entries (messages, deletes,
closes...) get their cursors per room in commit order, so the hub delivers them strictly in
sequence: a duplicate is dropped, and a gap (an entry the layer lost, for instance while
Redis restarted) is filled from the log before the newer entry is delivered. A periodic
resync compares each room with the database, so even a lost *last* entry arrives within
``RESYNC_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from channels.db import database_sync_to_async
from django.conf import settings

from gateway import metrics, policy, selectors, services
from gateway.events import (
    CONTROL_GROUP,
    ENTRY_CLOSE,
    ENTRY_POLICY,
    ENTRY_REOPEN,
    ROOM_DEVICE,
    ROOM_ENTRY,
    ROOM_MESSAGE,
    ROOM_PRESENCE,
    EventError,
    LogEntry,
    PresenceMember,
    RoomDevice,
    RoomPresence,
    control_decode,
    entry_cursor,
    log_entry_decode,
    room_device_decode,
    room_presence_decode,
)
from gateway.names import room_group_name
from gateway.policy import Policy
from gateway.presence import RoomRoster

logger = logging.getLogger(__name__)

GAP_FILL_PAGE = 500
# The scope extension through which a server offers to write one prepared frame to many
# sockets (gateway/server.py for daphne).
FRAME_WRITER_EXTENSION = "gateway.frame_writer"
# The scope extension through which a server tells how many bytes of a connection's output
# are still waiting for the client (a callable): a stream that lags is ended, not buffered.
SEND_BUFFER_EXTENSION = "gateway.send_buffer"
# And whether the client is still there (a callable): a long replay stops when it is gone,
# not once it has been read to the end for nobody.
CONNECTION_OPEN_EXTENSION = "gateway.connection_open"
# The in-memory layer forgets group members after a day (group_expiry); rejoin well before.
GROUP_REFRESH_SECONDS = 3600.0
# Why the core ends a subscriber's scope; each protocol says it its own way (a WebSocket
# close code, the end of a stream...).
END_SHUTDOWN = "shutdown"  # this process stops: reconnect (elsewhere) and resume
END_DISCONNECTED = "disconnected"  # staff disconnected it: do not come back by yourself


class _Framed:
    """Something on its way to local subscribers, encoded once per wire format for all."""

    __slots__ = ("_frames",)

    def __init__(self) -> None:
        self._frames: dict[str, Any] = {}

    def frame(self, wire_format: str, encode: Callable[[Any], Any]) -> Any:
        """Encoded for ``wire_format`` (``encode`` is given what ``_encoded`` says),
        computed once for all subscribers."""
        try:
            return self._frames[wire_format]
        except KeyError:
            frame = self._frames[wire_format] = encode(self._encoded())
            return frame

    def _encoded(self) -> Any:
        return self


class Delivery(_Framed):
    """One log entry on its way to local subscribers, with its encodings cached."""

    __slots__ = ("event", "cursor")

    def __init__(self, event: LogEntry):
        self.event = event
        self.cursor = entry_cursor(event)
        self._frames = {}

    def _encoded(self) -> LogEntry:
        return self.event


class Subscriber(Protocol):
    protocol: str
    scope_id: str

    async def deliver(self, delivery: Delivery) -> None: ...

    async def end(self, reason: str) -> None: ...


class PresenceChange(_Framed):
    """Who came and went in a room, on its way to the local watchers, with its encodings
    cached (as ``Delivery`` for log entries): a change is encoded once per process."""

    __slots__ = ("room", "joined", "left")

    def __init__(self, room: str, joined: list[PresenceMember],
                 left: list[PresenceMember]) -> None:
        super().__init__()
        self.room, self.joined, self.left = room, joined, left


class DeviceChange(_Framed):
    """A device's status or state changed (``room.device``), on its way to the local
    watchers, encoded once per process and format."""

    __slots__ = ("event",)

    def __init__(self, event: RoomDevice) -> None:
        super().__init__()
        self.event = event

    def _encoded(self) -> RoomDevice:
        return self.event


class PresenceSubscriber(Subscriber, Protocol):
    """A subscriber that is told who comes and goes, and how the room's devices are (it
    has asked ``RoomHub.roster``)."""

    async def presence_changed(self, change: PresenceChange) -> None: ...

    async def device_changed(self, change: DeviceChange) -> None: ...


class _RoomState:
    __slots__ = ("subscribers", "last_seq", "closed", "policy", "pending", "ready", "error",
                 "roster", "roster_loading", "roster_read", "watchers")

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.last_seq: int | None = None  # None until the room's position is read
        # As of last_seq: read with it, then kept by the log's entries (None: the room did
        # not exist when it was read, until an entry shows it does).
        self.closed: bool | None = None
        self.policy: Policy = policy.DEFAULT  # as of last_seq, kept by its policy entries
        self.pending: list[LogEntry] = []
        self.ready = asyncio.Event()
        self.error: BaseException | None = None
        # Kept once a subscriber asks for it (RoomHub.roster), with those told of changes.
        self.roster: RoomRoster | None = None
        self.roster_loading: list[RoomPresence] | None = None  # heard while it is read
        self.roster_read = asyncio.Event()  # set once a read of the roster ended
        self.watchers: set[PresenceSubscriber] = set()


class RoomHub:
    """The process's single receiver of room events."""

    def __init__(self, layer, *, process_id: str = "",
                 local_members: Callable[[str], list[PresenceMember]] | None = None,
                 local_member: Callable[[str], PresenceMember | None] | None = None) -> None:
        self.layer = layer
        self.process_id = process_id  # whose members local_members gives (for rosters)
        self.local_members = local_members or (lambda room: [])  # a room's, in this process
        self.local_member = local_member or (lambda scope: None)  # a scope's, in this process
        self.channel = ""
        self.rooms: dict[str, _RoomState] = {}
        self._lock = asyncio.Lock()  # serialises delivery, gap fill and resync
        self._membership = asyncio.Lock()  # serialises group_add/group_discard
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = {
            "received": 0, "delivered": 0, "duplicates": 0, "gap_filled": 0, "fell_behind": 0
        }

    async def start(self) -> None:
        self.channel = await self.layer.new_channel("hub.")
        await self.layer.group_add(CONTROL_GROUP, self.channel)
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="gateway-hub-receive"),
            asyncio.create_task(self._resync_loop(), name="gateway-hub-resync"),
            asyncio.create_task(self._rosters_loop(), name="gateway-hub-rosters"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for room in list(self.rooms):
            try:
                await self.layer.group_discard(room_group_name(room), self.channel)
            except Exception:
                logger.warning("group_discard failed at stop", extra={"room": room})
        self.rooms.clear()

    # --- membership --------------------------------------------------------------------

    async def subscribe(self, room: str, subscriber: Subscriber) -> None:
        """Add a local subscriber; returns once the room's position is known.

        Raises (and leaves nothing behind) if the room cannot be joined, for the first
        subscriber and for every one waiting on the same join.
        """
        state = self.rooms.get(room)
        first = state is None
        if state is None:
            state = self.rooms[room] = _RoomState()
        state.subscribers.add(subscriber)
        try:
            if first:
                await self._join(room, state)
            else:
                await state.ready.wait()
                if state.error is not None:
                    raise RuntimeError(f"could not join room {room}") from state.error
        except BaseException:
            await self.unsubscribe(room, subscriber)
            raise

    async def unsubscribe(self, room: str, subscriber: Subscriber) -> None:
        state = self.rooms.get(room)
        if state is None or subscriber not in state.subscribers:
            return
        state.subscribers.discard(subscriber)
        state.watchers.discard(subscriber)
        if state.subscribers:
            return
        del self.rooms[room]
        await self._leave_group(room)

    async def _leave_group(self, room: str) -> None:
        async with self._membership:
            if room in self.rooms:
                return  # re-joined while we waited for the lock
            try:
                await self.layer.group_discard(room_group_name(room), self.channel)
            except Exception:
                # Harmless: events for a room we no longer serve are ignored.
                logger.warning("could not leave room group", extra={"room": room})

    def last_seq(self, room: str) -> int | None:
        """The cursor of the newest entry delivered to the room's local subscribers (None if
        this process no longer serves the room)."""
        state = self.rooms.get(room)
        return None if state is None else state.last_seq

    def room_policy(self, room: str) -> Policy:
        """The room's policy as of the newest entry delivered here (the default for a room
        this process does not follow)."""
        state = self.rooms.get(room)
        return policy.DEFAULT if state is None else state.policy

    def room_closed(self, room: str) -> bool | None:
        """Whether the room was closed as of the newest entry delivered here; None if this
        process does not follow the room, or it did not exist when it was read (then only
        the database knows)."""
        state = self.rooms.get(room)
        return None if state is None or state.last_seq is None else state.closed

    async def roster(self, room: str, watcher: PresenceSubscriber) -> list[dict[str, object]]:
        """Who is in the room now (one entry per sender per protocol, with its connection
        count), and from now on ``watcher`` (a subscriber of the room) is told each change.
        The first to ask reads every process's row once; the roster is then kept from the
        room's presence events and checked against the rows every heartbeat."""
        state = self.rooms[room]
        if state.roster is None and state.roster_loading is not None:
            await state.roster_read.wait()  # another watcher is reading it
        if state.roster is None:
            state.roster_loading = []
            try:
                rows = (await database_sync_to_async(selectors.room_rosters)(
                    rooms=[room], exclude=self.process_id))[room]
                roster = RoomRoster()
                roster.replace({**rows, self.process_id: (-1, self.local_members(room))})
                for event in state.roster_loading:
                    roster.apply(event)
                state.roster = roster
            finally:
                state.roster_loading = None
                state.roster_read.set()
        elif (newcomer := self.local_member(watcher.scope_id)) is not None:
            # In the list it is given (its own join reaches the roster a moment later).
            await self._tell(room, state, *state.roster.add(self.process_id, newcomer))
        if watcher in state.subscribers:  # not gone while the roster was read
            state.watchers.add(watcher)
        return state.roster.snapshot()

    async def _on_presence(self, message: dict[str, Any]) -> None:
        try:
            event = room_presence_decode(message)
        except EventError as exc:
            logger.error("dropped malformed presence event: %s", exc, extra={"protocol": "layer"})
            return
        state = self.rooms.get(event["room"])
        if state is None:
            return
        if state.roster_loading is not None:
            state.roster_loading.append(event)
        elif state.roster is not None:
            await self._tell(event["room"], state, *state.roster.apply(event))

    async def _on_device(self, message: dict[str, Any]) -> None:
        """A device's status or state changed: told to the room's watchers here."""
        try:
            event = room_device_decode(message)
        except EventError as exc:
            logger.error("dropped malformed device event: %s", exc, extra={"protocol": "layer"})
            return
        state = self.rooms.get(event["room"])
        if state is None or not state.watchers:
            return
        change = DeviceChange(event)
        for watcher in tuple(state.watchers):
            try:
                await watcher.device_changed(change)
            except Exception:
                logger.exception("device change not delivered", extra={"scope": watcher.scope_id})

    async def _tell(self, room: str, state: _RoomState, joined: list[PresenceMember],
                    left: list[PresenceMember]) -> None:
        if not (joined or left):
            return
        change = PresenceChange(room, joined, left)
        for watcher in tuple(state.watchers):
            try:
                await watcher.presence_changed(change)
            except Exception:
                logger.exception("presence not delivered", extra={"scope": watcher.scope_id})

    async def rosters_refresh(self) -> None:
        """Check every kept roster against the processes' rows (one query for all rooms):
        a dead process's members go, a change an event lost comes."""
        rooms = [room for room, state in self.rooms.items() if state.roster is not None]
        if not rooms:
            return
        rows = await database_sync_to_async(selectors.room_rosters)(
            rooms=rooms, exclude=self.process_id)
        for room in rooms:
            state = self.rooms.get(room)
            if state is None or state.roster is None:
                continue
            found = {**rows[room], self.process_id: (-1, self.local_members(room))}
            await self._tell(room, state, *state.roster.replace(found))

    def subscribers(self) -> list[Subscriber]:
        return [sub for state in self.rooms.values() for sub in state.subscribers]

    async def _join(self, room: str, state: _RoomState) -> None:
        added = False
        try:
            async with self._membership:
                await self.layer.group_add(room_group_name(room), self.channel)
                added = True
            last_seq, closed, current = await database_sync_to_async(services.room_position)(
                room=room)
            async with self._lock:
                state.last_seq, state.closed = last_seq, closed
                state.policy = current or policy.DEFAULT
                pending, state.pending = state.pending, []
                for event in pending:
                    await self._advance(room, state, event)
        except BaseException as exc:
            state.error = exc
            if self.rooms.get(room) is state:
                del self.rooms[room]
            if added:
                await self._leave_group(room)
            raise
        finally:
            state.ready.set()  # waiters check state.error

    # --- delivery ----------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self.layer.receive(self.channel)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("channel layer receive failed", extra={"protocol": "layer"})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if message.get("type") == ROOM_PRESENCE:
                await self._on_presence(message)
                continue
            if message.get("type") == ROOM_DEVICE:
                await self._on_device(message)
                continue
            if message.get("type") not in (ROOM_MESSAGE, ROOM_ENTRY):
                await self._on_control(message)
                continue
            try:
                event = log_entry_decode(message)
            except EventError as exc:
                logger.error("dropped malformed room event: %s", exc, extra={"protocol": "layer"})
                continue
            self.stats["received"] += 1
            try:
                async with self._lock:
                    await self._on_event(event)
            except Exception:
                # For instance the database failing during a gap fill: the room keeps its
                # position, and the next event or resync fills the gap. Never stop receiving.
                logger.exception("room event not delivered yet", extra={"room": event["room"]})

    async def _on_control(self, message: dict[str, Any]) -> None:
        """A staff action outside any log: close the connection it names."""
        try:
            event = control_decode(message)
        except EventError as exc:
            logger.error("dropped malformed control event: %s", exc, extra={"protocol": "layer"})
            return
        targets = [s for s in self.subscribers() if s.scope_id == event["scope"]]
        for subscriber in targets:
            await subscriber.end(END_DISCONNECTED)

    async def _on_event(self, event: LogEntry) -> None:
        state = self.rooms.get(event["room"])
        if state is None:
            return  # nobody here any more
        if state.last_seq is None:
            state.pending.append(event)
            return
        await self._advance(event["room"], state, event)

    async def _advance(self, room: str, state: _RoomState, event: LogEntry) -> None:
        assert state.last_seq is not None
        seq = entry_cursor(event)
        if seq <= state.last_seq:
            self.stats["duplicates"] += 1
            return
        if seq > state.last_seq + 1:
            await self._fill_gap(room, state, upto=seq - 1)
        await self._fanout(state, event)

    async def _fill_gap(self, room: str, state: _RoomState, *, upto: int) -> None:
        assert state.last_seq is not None
        start = state.last_seq
        while state.last_seq < upto:
            missing, reached = await database_sync_to_async(selectors.room_log_after)(
                room=room, after=state.last_seq, upto=upto, limit=GAP_FILL_PAGE
            )
            if reached == state.last_seq:
                # Never happens while cursors are committed in order; do not wait forever.
                logger.error("gap not in the room's log", extra={"room": room, "upto": upto})
                state.last_seq = upto
                break
            for event in missing:
                await self._fanout(state, event)
            state.last_seq = reached  # past a deleted message's tombstone too
        self.stats["gap_filled"] += state.last_seq - start
        logger.info(
            "filled gap from history",
            extra={"protocol": "layer", "room": room, "after": start, "upto": upto},
        )

    async def _fanout(self, state: _RoomState, event: LogEntry) -> None:
        delivery = Delivery(event)
        state.last_seq = delivery.cursor
        kind = event.get("kind")  # a room.entry's (a message has none)
        if kind in (ENTRY_CLOSE, ENTRY_REOPEN):
            state.closed = kind == ENTRY_CLOSE
        elif kind == ENTRY_POLICY:
            state.policy = policy.policy_from_public(event["policy"] or {})  # type: ignore[typeddict-item]
        elif state.closed is None:
            state.closed = False  # stored in it, so it exists (and was open then)
        by_protocol: dict[str, int] = {}
        for subscriber in tuple(state.subscribers):
            by_protocol[subscriber.protocol] = by_protocol.get(subscriber.protocol, 0) + 1
            try:
                await subscriber.deliver(delivery)
            except Exception:
                logger.exception("delivery failed", extra={"room": event["room"]})
        self.stats["delivered"] += len(state.subscribers)
        if event["type"] != ROOM_MESSAGE:
            return
        for protocol, count in by_protocol.items():
            metrics.MESSAGES_OUT.labels(protocol).inc(count)
        metrics.BROADCAST_LATENCY.observe(max(0.0, time.time() - event["ts"]))

    # --- resync ------------------------------------------------------------------------

    async def _resync_loop(self) -> None:
        interval = settings.GATEWAY["RESYNC_INTERVAL"]
        since_refresh = 0.0
        while True:
            await asyncio.sleep(interval)
            since_refresh += interval
            try:
                await self.resync()
                if since_refresh >= GROUP_REFRESH_SECONDS:
                    since_refresh = 0.0
                    await self._refresh_groups()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("resync failed; will retry", extra={"protocol": "layer"})

    async def _rosters_loop(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(settings.GATEWAY["HEARTBEAT_INTERVAL"])
            try:
                await self.rosters_refresh()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                if failures & (failures - 1) == 0:  # 1, 2, 4, 8...: an outage logs little
                    logger.exception("presence rosters not refreshed; will retry",
                                     extra={"protocol": "layer"})

    async def resync(self) -> None:
        """Deliver anything stored that the layer has not brought yet."""
        rooms = [room for room, state in self.rooms.items() if state.last_seq is not None]
        if not rooms:
            return
        stored = await database_sync_to_async(selectors.room_last_seqs)(rooms=rooms)
        async with self._lock:
            for room, last in stored.items():
                state = self.rooms.get(room)
                if state is not None and state.last_seq is not None and last > state.last_seq:
                    await self._fill_gap(room, state, upto=last)

    async def _refresh_groups(self) -> None:
        async with self._membership:
            await self.layer.group_add(CONTROL_GROUP, self.channel)
            for room in list(self.rooms):
                await self.layer.group_add(room_group_name(room), self.channel)

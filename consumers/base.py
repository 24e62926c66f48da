"""The behaviour every room consumer shares: join, catch up, relay, leave."""

from __future__ import annotations

import logging
import uuid

from channels.consumer import AsyncConsumer, get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.conf import settings

from gateway import events as contract
from gateway import selectors, services
from gateway.events import RoomEntry, RoomMessage
from gateway.fanout import Delivery
from gateway.logging import scope_log
from gateway.runtime import Runtime, get_runtime

logger = logging.getLogger(__name__)


class ScopeConsumer(AsyncConsumer):
    """A consumer fed only by its scope's protocol server.

    Two departures from ``AsyncConsumer``, both for the fan-out path (shared/PERFORMANCE.md):
    no per-consumer channel on the layer (room events reach consumers through the process's
    hub), and no ``aclose_old_connections()`` thread hop before every handler (database work
    goes through ``database_sync_to_async``, which manages connections itself).
    """

    async def __call__(self, scope, receive, send) -> None:
        self.scope = scope
        self.base_send = send
        self.setup()
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            await self.finish()

    def setup(self) -> None:
        """Set the instance up before its first event."""

    async def finish(self) -> None:
        """Clean up after the last event, however the scope ended."""

    async def dispatch(self, message) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


class RoomConsumer(ScopeConsumer):
    """A scope in one room, fed by the process's hub."""

    protocol = ""

    def setup(self) -> None:
        self.scope_id = f"{self.protocol}-{uuid.uuid4().hex[:12]}"
        self.room: str | None = None
        self.runtime: Runtime | None = None
        self.live = False
        self.closed = False  # set once the server decided to close this scope
        self.listening = False
        self.last_sent = 0
        self.close_replayed = False  # a close met in a replay, with no reopen after it yet

    async def finish(self) -> None:
        await self.room_leave()

    def log_extra(self, **fields: object) -> dict[str, object]:
        return scope_log(self.protocol, self.room, self.scope_id, **fields)

    # --- room membership ---------------------------------------------------------------

    async def room_enter(
        self, room: str, *, staff: bool, creator: str | None
    ) -> tuple[bool, contract.Sender]:
        """``services.room_enter`` for this scope's sender: whether the room is closed, and
        the sender as the room shows it. A room this process follows already needs no
        database hop (its hub knows whether it is closed, and the staff names are at hand):
        most connects of a busy room. Only an open room is taken from the hub: one it holds
        as closed may have been reopened a moment ago (the database says)."""
        runtime = await get_runtime()
        closed = runtime.hub.room_closed(room)
        sender = self.sender
        name = services.display_name_known(sender_id=sender["id"], protocol=sender["protocol"],
                                           name=sender["name"])
        if closed is not False or name is None:
            return await database_sync_to_async(services.room_enter)(
                room=room, sender=sender, staff=staff, creator=creator)
        return closed, contract.sender(protocol=sender["protocol"], id=sender["id"], name=name)

    async def room_join(
        self, room: str, *, member_id: str | None, name: str = "", listen: bool = True
    ) -> None:
        """Join a room: with ``listen``, subscribe to its messages (held back until
        ``room_catch_up``); with a ``member_id``, show in its presence."""
        self.runtime = await get_runtime()
        if listen:
            await self.runtime.hub.subscribe(room, self)
            self.joined_at = self.runtime.hub.last_seq(room) or 0
        self.listening = listen
        self.room = room
        if member_id is not None:
            self.runtime.presence.add(
                scope=self.scope_id, room=room, protocol=self.protocol, member_id=member_id,
                name=name,
            )
        logger.info("joined room", extra=self.log_extra(member=member_id, listen=listen))

    async def room_leave(self) -> None:
        if self.room is None or self.runtime is None:
            return
        room, self.room = self.room, None
        self.live = False
        self.runtime.presence.remove(self.scope_id)
        if self.listening:
            await self.runtime.hub.unsubscribe(room, self)
        logger.info("left room", extra=scope_log(self.protocol, room, self.scope_id))

    async def room_catch_up(self, after: int | None) -> None:
        """Send the room's log entries after the cursor ``after`` (or from the join), then go
        live.

        While catching up, live deliveries are ignored: they are at most the hub's position,
        which the loop reads again before it goes live, so nothing is missed or sent twice.
        The loop stops as soon as the scope is closing (the client left or fell behind).
        """
        assert self.runtime is not None and self.room is not None
        hub, room = self.runtime.hub, self.room
        page = settings.GATEWAY["HISTORY_MAX_PAGE_SIZE"]
        target = hub.last_seq(room)
        position = self.joined_at if after is None else min(after, target or 0)
        if after is not None and target is not None and after < target:
            horizon = await database_sync_to_async(selectors.room_horizon)(room=room)
            if after < horizon:  # retention removed some of what it asks for: say so
                await self.send_pruned(after=after, first_available=horizon + 1)
        while target is not None and position < target and self.is_open():
            entries, reached = await database_sync_to_async(selectors.room_log_after)(
                room=room, after=position, upto=target, limit=page
            )
            for entry in entries:
                if not self.is_open():
                    return
                await self._send_entry(Delivery(entry))
            position = reached if reached > position else target
            target = hub.last_seq(room)
        if target is None or not self.is_open():
            return  # the hub left the room (shutdown) or the scope is closing
        if after is not None and after > position:
            after = await self._cursor_checked(after)
        # A client that has seen more than this process has delivered (another replica got
        # there first) must not get those messages twice when they arrive here.
        self.last_sent = max(position, after or 0)
        self.live = True
        if self.close_replayed:  # closed while it was away, and not reopened since
            self.close_replayed = False
            await self.room_closed()

    async def _cursor_checked(self, after: int) -> int:
        """A cursor beyond what this process has delivered: another replica may have got
        there first, but nothing is delivered anywhere before it is stored, so a cursor
        beyond the room's stored log is not one of this room's (a restored database, a stale
        client): it would silently swallow what comes next. Taken as the log's end."""
        assert self.room is not None
        stored = await database_sync_to_async(services.room_open)(room=self.room)
        if after <= stored:
            return after
        logger.warning("a client's cursor is beyond the room's log; resuming from its end",
                       extra=self.log_extra(after=after, stored=stored))
        return stored

    def is_open(self) -> bool:
        """Whether the scope can still take messages; protocols may know more."""
        return not self.closed

    # --- delivery (called by the hub) --------------------------------------------------

    async def deliver(self, delivery: Delivery) -> None:
        if not self.live or delivery.cursor <= self.last_sent:
            return
        self.last_sent = delivery.cursor
        await self._send_entry(delivery)

    async def _send_entry(self, delivery: Delivery) -> None:
        event = delivery.event
        if event["type"] == contract.ROOM_MESSAGE:
            return await self.send_room_event(event, delivery)  # type: ignore[arg-type]
        if not self.live:
            # Replayed: a close counts only if no reopen follows it (room_closed is called
            # once the replay is over); live, send_room_entry decides at once.
            if event["kind"] == contract.ENTRY_CLOSE:  # type: ignore[typeddict-item]
                self.close_replayed = True
            elif event["kind"] == contract.ENTRY_REOPEN:  # type: ignore[typeddict-item]
                self.close_replayed = False
        await self.send_room_entry(event, delivery)  # type: ignore[arg-type]

    async def send_room_event(self, event: RoomMessage, delivery: Delivery) -> None:
        """Translate a room message into this protocol; implemented per protocol."""
        raise NotImplementedError

    async def send_pruned(self, *, after: int, first_available: int) -> None:
        """The client resumes from ``after``, but retention pruned the log before
        ``first_available``: say so, once, before the replay; by default nothing."""

    async def send_room_entry(self, entry: RoomEntry, delivery: Delivery) -> None:
        """Any other log entry (a delete, a close, a reopen); by default nothing (a relay
        keeps relaying; history no longer has a deleted message)."""

    async def room_closed(self) -> None:
        """Staff closed the room: live, or while this scope was away with no reopen after
        (then once its replay is over). By default nothing: a relay keeps relaying."""

    async def end(self, reason: str) -> None:
        """The core ends the scope (``fanout.END_SHUTDOWN``, ``END_DISCONNECTED``); by default
        it closes it (a protocol with close codes maps the reason to its own)."""
        await self.close(0)

    async def close(self, code: int) -> None:
        """Close the scope from the server side, with the protocol's ``code`` if it has
        codes (a room closed, a client too slow)."""
        raise NotImplementedError

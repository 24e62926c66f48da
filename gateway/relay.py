"""The relay: each room's log delivered to outbound targets, in order, durably, once per role.

Outbound targets are what follows a room without a connection of its own: an MQTT room's
``out`` topic, a Telegram chat, later a webhook. A protocol describes one kind of them as a
``RelayRole`` (which targets follow which rooms, and how to carry entries to one); the relay
does the rest, the same way for every protocol:

- **One process per role.** The role's lease (gateway/lease.py, named after the role) elects
  the process that delivers; another takes over within the lease's time to live.
- **A durable position per room and target** (``RelayCursor``): the cursor of the last entry
  delivered. Delivery resumes there after a restart, a crash or a takeover. Positions are
  saved in batches (``save_interval``), or after each delivery before the next one
  (``save_interval = 0``: a crash then repeats at most the entry in flight).
- **Rooms with news.** The relay follows a room (one hub subscription, shared by all its
  targets) only while some target is behind: a scan every ``TICK`` finds such rooms in one
  query, and, for roles that serve every room, an entry committed in this process follows
  its room at once. A room caught up and quiet for ``idle_timeout`` is left.
- **Batches, in order.** Each target has a worker that hands the role up to ``batch_size``
  entries after its position and moves the position on once they are delivered. Recent
  entries come from a bounded tail of the room shared by its targets (no database read on
  the live path); a target further behind reads the log. A delivery that fails is retried
  with backoff and jitter, never skipped; a target that no longer exists (``TargetGone``)
  is dropped.
- **Bounded backlog.** A target more than ``backlog`` entries behind skips the oldest ones:
  counted (``gateway_relay_skipped_total``), logged, and told to the target through the
  role's ``skipped``. Roles without a backlog never skip: a target that cannot keep up only
  holds its own position (memory stays bounded by the tail, whatever the backlog).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from channels.db import database_sync_to_async
from django.db.models import QuerySet

from gateway import broadcast, events, metrics, selectors, services, status
from gateway.fanout import Delivery, RoomHub
from gateway.lease import Lease, jitter
from gateway.policy import DEFAULT as DEFAULT_POLICY
from gateway.policy import Policy, policy_from_public
from gateway.runtime import get_runtime

logger = logging.getLogger(__name__)

TICK = 1.0  # seconds: the lease's renewal, the scan for rooms with news, positions saved
LEASE_TTL = 10.0  # another process takes a role over within this after its holder dies
TAIL_LIMIT = 1000  # recent entries a followed room keeps for its targets
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # backoff (seconds) of a delivery that failed
STOP_WAIT = 3.0  # seconds deliveries in progress get to finish at a stop
SKIP_LOG_INTERVAL = 10.0  # at most one log line per role this often for skipped entries
WARN_INTERVAL = 30.0  # a warning that repeats while something is down, at most this often
# A role without a holder longer than this (the protocol was off) starts what it never
# delivered from the takeover; after a shorter gap (a restart, a takeover after a crash), a
# role with ``from_start`` delivers new targets from their first entry.
FRESH_START_AFTER = 3600.0


class TargetGone(Exception):
    """Raised by ``RelayRole.deliver`` or ``skipped``: the target is gone (a chat blocked the
    bot, a webhook was deleted); the relay stops delivering to it."""


@dataclass
class Batch:
    """Entries for one target, in cursor order, all after its position. A role that carries
    them one by one says how far it got with ``done`` (then a delivery cut short, by an error
    or a stop, keeps what it delivered); otherwise the batch counts as a whole once
    ``deliver`` returns. ``policy`` is the room's (how senders are shown to the role's
    protocol: ``policy.name_shown``)."""

    room: str
    target: str
    entries: list[Delivery]
    done_upto: int | None = None
    policy: Policy = DEFAULT_POLICY

    def done(self, cursor: int) -> None:
        """The entries up to ``cursor`` are delivered."""
        self.done_upto = cursor


class RelayRole:
    """One kind of outbound target, described by its protocol (protocols/<name>/relay.py).

    The relay calls ``targets`` in the database thread and ``deliver``/``skipped`` on the
    event loop; a role carries entries and keeps no positions of its own.
    """

    name = ""  # the role's lease and positions (RelayCursor.relay)
    protocol = ""  # for logs and metrics
    every_room = False  # every room has targets: a commit here follows its room at once
    # A target new to the role starts at its room's first entry, not now (unless the role had
    # no holder for FRESH_START_AFTER: then what it never delivered starts from the takeover).
    from_start = False
    refresh_targets = True  # targets come and go while a room is followed (re-read each tick)
    batch_size = 100  # entries handed to one ``deliver``
    backlog: int | None = None  # entries a target may be behind before the oldest are skipped
    # Seconds between position saves. 0: each delivery is saved before the next, and the
    # target's stored position is read before each (a target that left, or was placed afresh,
    # is seen at once).
    save_interval = 1.0
    idle_timeout: float | None = None  # leave a caught-up room quiet this long (None: never)

    def targets(self) -> QuerySet:
        """The role's targets: a query of rows with ``room`` (a room name) and ``target``
        (a string naming the target, "" for a room's only one); optionally ``head``, the
        room's newest cursor, if the query has it at hand."""
        raise NotImplementedError

    async def deliver(self, batch: Batch) -> None:
        """Carry the batch's entries (every kind of log entry) to its target; return once they
        are delivered, or raise (the relay tries again from what was ``done``; ``TargetGone``
        drops the target). Entries a target does not take (a delete, to a topic that only
        carries messages) are simply passed over."""
        raise NotImplementedError

    async def skipped(self, room: str, target: str, *, after: int, upto: int) -> None:
        """The target fell more than ``backlog`` behind: the entries with ``after < cursor <=
        upto`` are skipped. Tell it, if its protocol can; by default nothing."""

    def status(self) -> dict[str, Any]:
        """What the role adds to the relay's status; by default nothing."""
        return {}


def _policy_cut(entries: list[Delivery], protocol: str) -> int | None:
    """The index of the first policy entry after which the room no longer reaches
    ``protocol``; None if there is none."""
    for index, delivery in enumerate(entries):
        event = delivery.event
        if event["type"] == events.ROOM_ENTRY and event["kind"] == events.ENTRY_POLICY:  # type: ignore[typeddict-item]
            policy = policy_from_public(event["policy"] or {})  # type: ignore[typeddict-item]
            if not policy.receives(protocol):
                return index
    return None


class _Target:
    __slots__ = ("key", "position", "wake", "task")

    def __init__(self, key: str, position: int) -> None:
        self.key = key
        self.position = position  # the cursor of the last entry delivered to it
        self.wake = asyncio.Event()  # set when its room has news
        self.task: asyncio.Task[None] | None = None


class _Feed:
    """A room the relay follows: its hub subscription, its recent entries, its targets.

    The tail holds every deliverable entry with ``tail_from < cursor <= head``: what the hub
    delivered since the feed joined, less what every target has passed (and at most
    ``TAIL_LIMIT``); anything older is read from the log.
    """

    def __init__(self, relay: Relay, room: str) -> None:
        self.relay = relay
        self.room = room
        self.protocol = relay.role.protocol  # what the hub counts its deliveries as
        self.scope_id = f"relay-{relay.role.name}-{room}"
        self.hub: RoomHub | None = None
        self.ready = False
        self.tail: deque[Delivery] = deque()
        self.tail_from = 0
        self.head = 0  # the newest cursor delivered by the hub (or its position at the join)
        self.targets: dict[str, _Target] = {}
        self.active_at = time.monotonic()

    async def join(self, hub: RoomHub) -> None:
        await hub.subscribe(self.room, self)
        self.hub = hub
        # Whatever the hub delivered before this line is at most its position: read from the
        # log, if a target needs it. Whatever comes after is in the tail.
        self.tail_from = self.head = hub.last_seq(self.room) or 0
        self.ready = True

    async def leave(self) -> None:
        self.ready = False
        if self.hub is not None:
            await self.hub.unsubscribe(self.room, self)

    # --- the hub's subscriber -------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> None:
        if not self.ready or delivery.cursor <= self.head:
            return
        self.head = delivery.cursor
        self.active_at = time.monotonic()
        event = delivery.event
        if event["type"] == events.ROOM_ENTRY:
            self._current(cast(events.RoomEntry, event))
        self.tail.append(delivery)
        while len(self.tail) > TAIL_LIMIT:
            self.tail_from = self.tail.popleft().cursor
        for target in self.targets.values():
            target.wake.set()

    async def end(self, reason: str) -> None:
        """The hub stops serving the room (this process is shutting down)."""
        self.relay._feed_ended(self)

    def _current(self, entry: events.RoomEntry) -> None:
        """Keep the tail in its messages' current state, as the log is read, for the targets
        that have not had it yet: after an edit, the message and the replies quoting it have
        its new text and its earlier edits are gone; after a delete, the message, its edits
        and its reactions are gone and the replies quoting it have no excerpt. (What a
        target was sent already, it had live.)"""
        kind, message_id = entry["kind"], entry["id"]
        if kind not in (events.ENTRY_EDIT, events.ENTRY_DELETE) or message_id is None:
            return
        kept: deque[Delivery] = deque()
        for delivery in self.tail:
            event = delivery.event
            if event["type"] == events.ROOM_ENTRY:
                about = cast(events.RoomEntry, event)
                if about["id"] == message_id and (kind == events.ENTRY_DELETE
                                                  or about["kind"] == events.ENTRY_EDIT):
                    continue  # superseded by this entry
                kept.append(delivery)
                continue
            message = cast(events.RoomMessage, event)
            if message["id"] == message_id:
                if kind == events.ENTRY_DELETE:
                    continue  # not delivered to a target that has not had it yet
                edited: events.RoomMessage = {**message, "text": cast(str, entry["text"]),
                                              "edited_at": entry["ts"]}
                delivery = Delivery(edited)
            elif (reply := message["reply_to"]) is not None and reply["id"] == message_id:
                excerpt = "" if kind == events.ENTRY_DELETE else cast(str, entry["text"])
                quoting: events.RoomMessage = {**message, "reply_to": events.reply_ref(
                    id=message_id, sender=reply["sender"], text=excerpt)}
                delivery = Delivery(quoting)
            kept.append(delivery)
        self.tail = kept

    # --- the targets' reads ---------------------------------------------------------------

    async def read(self, after: int, limit: int) -> tuple[list[Delivery], int]:
        """Up to ``limit`` entries after the cursor ``after``, and the cursor they reach (past
        deleted messages too)."""
        if after >= self.tail_from:
            found: list[Delivery] = []
            for delivery in self.tail:
                if delivery.cursor > after:
                    found.append(delivery)
                    if len(found) == limit:
                        return found, delivery.cursor
            return found, self.head
        upto = self.tail_from
        entries, reached = await database_sync_to_async(selectors.room_log_after)(
            room=self.room, after=after, upto=upto, limit=limit
        )
        return [Delivery(entry) for entry in entries], reached if reached > after else upto

    def trim(self) -> None:
        """Forget the entries every target has passed."""
        low = min((t.position for t in self.targets.values()), default=self.head)
        while self.tail and self.tail[0].cursor <= low:
            self.tail_from = self.tail.popleft().cursor
        if not self.tail:
            self.tail_from = max(self.tail_from, min(low, self.head))

    def caught_up(self) -> bool:
        return all(t.position >= self.head for t in self.targets.values())

    async def horizon(self) -> int:
        """The cursor up to which retention pruned the room's log (read now)."""
        return await database_sync_to_async(selectors.room_horizon)(room=self.room)

    def policy(self) -> Policy:
        """The room's policy as the hub knows it (as of the newest entry it delivered)."""
        return self.hub.room_policy(self.room) if self.hub is not None else DEFAULT_POLICY


class Relay:
    """One role's delivery, in the process that holds its lease (every process runs one; the
    others wait for the lease). Started and stopped by ``gateway run`` like a server."""

    def __init__(self, role: RelayRole, *, lease_ttl: float = LEASE_TTL, tick: float = TICK):
        self.role = role
        self.tick = tick
        self.lease = Lease(role.name, ttl=lease_ttl)
        self.leader = False
        self.rooms: dict[str, _Feed] = {}
        self.stats: Counter[str] = Counter()
        self._term = 0  # counts leaderships: work begun under an earlier one is dropped
        self._dirty: dict[tuple[str, str], int] = {}  # positions delivered, not yet saved
        self._news: set[str] = set()  # rooms with entries committed here, to follow
        self._wakeup = asyncio.Event()
        self._saved_at = 0.0
        self._skip_logged_at = float("-inf")
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (logged at, not logged since)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._log = {"protocol": role.protocol, "relay": role.name}

    @property
    def status_name(self) -> str:
        return f"relay:{self.role.name}"

    def status(self) -> dict[str, Any]:
        """For /readyz and the dashboard: a relay that does not lead is ready too."""
        behind = max((f.head - t.position for f in self.rooms.values()
                      for t in f.targets.values()), default=0)
        return {"ready": True, "leader": self.leader, "rooms": len(self.rooms),
                "targets": sum(len(f.targets) for f in self.rooms.values()),
                "behind": max(behind, 0), "unsaved": len(self._dirty),
                "delivered": self.stats["delivered"], "skipped": self.stats["skipped"],
                "retries": self.stats["retries"], "gone": self.stats["gone"],
                **self.role.status()}

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        status.register(self.status_name, self.status)
        if self.role.every_room:
            broadcast.committed_listen(self._committed)
        # The first round before returning: the status says at once whether this process
        # delivers the role.
        await self._guarded(self._round)
        self._task = asyncio.create_task(self._run(), name=f"relay-{self.role.name}")

    async def stop(self) -> None:
        """Let deliveries in progress finish (briefly), save every position, hand over."""
        broadcast.committed_unlisten(self._committed)
        self._stopping = True  # the loop ends even if a cancellation is lost (see _run)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.leader:
            await self._step_down(wait=STOP_WAIT, save=True)
        await self.lease.release()  # also when it was taken but the takeover not done
        status.unregister(self.status_name)
        logger.info("relay stopped", extra={**self._log, **self.stats})

    async def _run(self) -> None:
        next_round = time.monotonic() + self.tick
        while not self._stopping:
            if time.monotonic() >= next_round:
                await self._guarded(self._round)
                next_round = time.monotonic() + self.tick
            if self._news:
                rooms, self._news = self._news, set()
                if self.leader:
                    await self._guarded(functools.partial(self._follow, rooms))
            self._wakeup.clear()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
            # comes as the event is set, and this loop would go on after stop().
            try:
                async with asyncio.timeout(max(0.0, next_round - time.monotonic())):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _guarded(self, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The database or the layer down: said once, then every WARN_INTERVAL.
            self._warn("housekeeping", "relay housekeeping failed (%s); will retry", exc,
                       exc_info=True)

    async def _round(self) -> None:
        held = await self.lease.renew()
        if held and not self.leader:
            await self._take_over()
        elif not held and self.leader:
            await self._step_down(wait=0.0, save=False)
            logger.warning("lost the relay lease; another process delivers now", extra=self._log)
        if not self.leader:
            return
        await self._leave_idle()
        if time.monotonic() - self._saved_at >= self.role.save_interval:
            await self._save()
        if self.role.refresh_targets:
            await self._refresh()
        await self._scan()

    async def _take_over(self) -> None:
        """This process now holds the role. If the role had no holder for long (or never),
        the targets it never delivered start from now; after a restart or a takeover, a
        role with ``from_start`` delivers a new target from its room's first entry (a room
        created meanwhile misses nothing)."""
        vacant = self.lease.vacant_since
        gap = (datetime.now(UTC) - vacant).total_seconds() if vacant is not None else None
        placed = 0
        if self.role.from_start and (gap is None or gap > FRESH_START_AFTER):
            placed = await database_sync_to_async(services.relay_targets_init)(
                relay=self.role.name, targets=self.role.targets()
            )
        self.leader = True
        self._term += 1
        logger.info("this process now relays %s", self.role.name,
                    extra={**self._log, "vacant_seconds": gap, "placed_from_now": placed})

    async def _step_down(self, *, wait: float, save: bool) -> None:
        """Stop delivering: at a stop, after letting what is in progress finish and saving the
        positions; on a lost lease at once (another process delivers now)."""
        self.leader = False
        self._term += 1
        feeds, self.rooms = list(self.rooms.values()), {}
        tasks = [t.task for f in feeds for t in f.targets.values() if t.task is not None]
        for feed in feeds:
            for target in feed.targets.values():
                target.wake.set()  # a waiting worker sees it is over
        if tasks and wait:
            await asyncio.wait(tasks, timeout=wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if save:
            await self._guarded(self._save)
        self._dirty.clear()
        for feed in feeds:
            await self._guarded(feed.leave)

    # --- which rooms are followed ---------------------------------------------------------

    def _committed(self, event: Mapping[str, Any]) -> None:
        """An entry was committed in this process (on the publisher's loop): follow its room
        now rather than at the next scan."""
        room = event.get("room")
        if self.leader and isinstance(room, str) and room not in self.rooms:
            self._news.add(room)
            self._wakeup.set()

    async def _scan(self) -> None:
        pending = await database_sync_to_async(selectors.relay_rooms_pending)(
            relay=self.role.name, targets=self.role.targets()
        )
        await self._follow([room for room, _ in pending])

    async def _follow(self, rooms: Iterable[str]) -> None:
        """Follow these rooms (those not followed yet), with their targets."""
        term = self._term
        new = sorted(set(rooms) - self.rooms.keys())
        if not new:
            return
        targets = await database_sync_to_async(services.relay_targets_open)(
            relay=self.role.name, targets=self.role.targets(), rooms=new,
            from_start=self.role.from_start,
        )
        try:
            hub = (await get_runtime()).hub
        except Exception as exc:
            return self._warn("runtime", "cannot follow rooms: the runtime is not up (%s); "
                              "will retry", exc)
        for room in new:
            if term != self._term or room in self.rooms or not targets[room]:
                continue
            feed = self.rooms[room] = _Feed(self, room)
            try:
                await feed.join(hub)
            except Exception as exc:
                # The layer or the database is down: the next scan tries again.
                if self.rooms.get(room) is feed:
                    del self.rooms[room]
                self._warn("join", "could not follow a room (%s); will retry", exc, room=room)
                continue
            if term != self._term or self.rooms.get(room) is not feed:
                await feed.leave()  # the role was lost meanwhile
                continue
            for key, position in targets[room].items():
                self._target_add(feed, key, max(position, self._dirty.get((room, key), 0)))

    def _warn(self, kind: str, text: str, *args: object, exc_info: bool = False,
              **fields: object) -> None:
        """A warning that repeats while something is down: logged once per WARN_INTERVAL
        for its kind, with how many were not logged since."""
        now = time.monotonic()
        last, quiet = self._warned.get(kind, (float("-inf"), 0))
        if now - last < WARN_INTERVAL:
            self._warned[kind] = (last, quiet + 1)
            return
        self._warned[kind] = (now, 0)
        logger.warning(text, *args, exc_info=exc_info,
                       extra={**self._log, **fields, "not_logged": quiet})

    async def _refresh(self) -> None:
        """Targets that joined or left the rooms followed: one query for all of them, and
        the positions only of those new here."""
        if not self.rooms:
            return
        term = self._term
        pairs = await database_sync_to_async(selectors.relay_targets_list)(
            targets=self.role.targets()
        )
        if term != self._term:
            return
        by_room: dict[str, set[str]] = {}
        for room, target in pairs:
            if room in self.rooms:
                by_room.setdefault(room, set()).add(target)
        joined = []
        for room, feed in self.rooms.items():
            now = by_room.get(room, set())
            for key in feed.targets.keys() - now:
                self._target_remove(feed, key)
            if now - feed.targets.keys():
                joined.append(room)
        if not joined:
            return
        targets = await database_sync_to_async(services.relay_targets_open)(
            relay=self.role.name, targets=self.role.targets(), rooms=joined,
            from_start=self.role.from_start,
        )
        if term != self._term:
            return
        for room, found in targets.items():
            if (following := self.rooms.get(room)) is None:
                continue
            for key in found.keys() - following.targets.keys():
                self._target_add(following, key,
                                 max(found[key], self._dirty.get((room, key), 0)))

    async def _leave_idle(self) -> None:
        """Leave the rooms with no target left, and those caught up and quiet for the role's
        ``idle_timeout`` (the scan follows them again when they have news)."""
        idle = self.role.idle_timeout
        cutoff = time.monotonic() - idle if idle is not None else None
        for room, feed in list(self.rooms.items()):
            quiet = cutoff is not None and feed.active_at < cutoff and feed.caught_up()
            if feed.targets and not quiet:
                continue
            del self.rooms[room]
            for key in list(feed.targets):
                self._target_remove(feed, key)
            await feed.leave()
            self._saved_at = 0.0  # its positions are saved in this round, not later

    def _feed_ended(self, feed: _Feed) -> None:
        if self.rooms.get(feed.room) is feed:
            del self.rooms[feed.room]
        feed.ready = False
        for key in list(feed.targets):
            self._target_remove(feed, key)

    def _target_add(self, feed: _Feed, key: str, position: int) -> None:
        target = feed.targets[key] = _Target(key, position)
        target.task = asyncio.create_task(
            self._serve(feed, target), name=f"relay-{self.role.name}-{feed.room}-{key}"
        )
        target.task.add_done_callback(functools.partial(self._worker_ended, feed, target))

    def _worker_ended(self, feed: _Feed, target: _Target, task: asyncio.Task[None]) -> None:
        """A worker that failed (a bug) is logged and its target dropped: the next refresh,
        or following the room again, starts it afresh from its position."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("a relay worker failed", exc_info=task.exception(),
                     extra={**self._log, "room": feed.room, "target": target.key})
        if feed.targets.get(target.key) is target:
            del feed.targets[target.key]

    def _target_remove(self, feed: _Feed, key: str) -> None:
        target = feed.targets.pop(key, None)
        if target is not None and target.task is not None:
            if target.task is not asyncio.current_task():
                target.task.cancel()
        feed.trim()

    # --- delivery -------------------------------------------------------------------------

    async def _serve(self, feed: _Feed, target: _Target) -> None:
        """A target's worker: deliver what follows its position, batch by batch, in order."""
        role, retry, failures = self.role, RETRY_FIRST, 0
        while self.leader and feed.targets.get(target.key) is target:
            if target.position >= feed.head:
                target.wake.clear()
                await target.wake.wait()
                continue
            batch: Batch | None = None
            try:
                if role.save_interval == 0 and not await self._still_placed(feed, target):
                    continue
                if role.backlog is not None and feed.head - target.position > role.backlog:
                    await self._skip(feed, target, upto=feed.head - role.backlog)
                    continue
                if target.position < feed.tail_from and (
                        horizon := await feed.horizon()) > target.position:
                    # Retention pruned what it has not had: skipped, and told.
                    await self._skip(feed, target, upto=horizon, why="pruned")
                    continue
                entries, reached = await feed.read(target.position, role.batch_size)
                cut = _policy_cut(entries, role.protocol)
                if cut is not None:
                    reached, entries = entries[cut].cursor, entries[:cut]
                if entries:
                    batch = Batch(feed.room, target.key, entries, policy=feed.policy())
                    await role.deliver(batch)
                    self.stats["delivered"] += len(entries)
                    metrics.RELAY_DELIVERED.labels(role.name).inc(len(entries))
                if cut is not None:
                    await self._leave_at(feed, target, reached)
                    return
                await self._advance(feed, target, reached)
            except TargetGone:
                self._gone(feed, target, "it is gone")
                return
            except asyncio.CancelledError:
                self._keep_partial(feed, target, batch)  # saved by the stop that cancelled it
                raise
            except Exception as exc:
                self._keep_partial(feed, target, batch)
                if not self.leader:
                    return  # stopping or stepping down: its transport may be going away
                failures += 1
                self.stats["retries"] += 1
                metrics.RELAY_RETRIES.labels(role.name).inc()
                delay = jitter(retry)
                if failures & (failures - 1) == 0:  # failures 1, 2, 4, 8...: an outage logs little
                    logger.warning("relay delivery failed (%s); attempt %d, retrying in %.1fs",
                                   exc, failures, delay, exc_info=failures == 1,
                                   extra={**self._log, "room": feed.room, "target": target.key,
                                          "after": target.position})
                await asyncio.sleep(delay)
                retry = min(retry * 2, RETRY_MAX)
                continue
            retry, failures = RETRY_FIRST, 0

    async def _still_placed(self, feed: _Feed, target: _Target) -> bool:
        """For a role whose every delivery is recorded: read the target's stored position
        first. Gone: the target left its room (a chat's /leave, a block) and is dropped now,
        not at the next refresh. Ahead: it was placed afresh (it joined again, was
        unblocked) and goes on from there, not with what was said meanwhile."""
        stored = await database_sync_to_async(selectors.relay_position)(
            relay=self.role.name, room=feed.room, target=target.key
        )
        if stored is None and (feed.room, target.key) not in self._dirty:
            self._gone(feed, target, "it left the room")
            return False
        if stored is not None and stored > target.position:
            target.position = stored
            feed.trim()
        return True

    async def _leave_at(self, feed: _Feed, target: _Target, cursor: int) -> None:
        """The room no longer reaches this role's protocol from the policy entry at
        ``cursor`` on: the target's position is that entry (saved now), and it is no longer
        served (the role's targets leave it out; when the room reaches the protocol again,
        the services place it at that later entry)."""
        logger.info("a relay target stops: the room's policy no longer reaches it",
                    extra={**self._log, "room": feed.room, "target": target.key,
                           "cursor": cursor})
        await self._advance(feed, target, cursor)
        if (dirty := self._dirty.pop((feed.room, target.key), None)) is not None:
            await self._guarded(functools.partial(
                self._save_now, {(feed.room, target.key): dirty}))
        self._target_remove(feed, target.key)

    async def _save_now(self, positions: dict[tuple[str, str], int]) -> None:
        await database_sync_to_async(services.relay_positions_save)(
            relay=self.role.name, positions=positions)

    def _gone(self, feed: _Feed, target: _Target, why: str) -> None:
        self.stats["gone"] += 1
        logger.info("a relay target is dropped: %s", why,
                    extra={**self._log, "room": feed.room, "target": target.key})
        self._dirty.pop((feed.room, target.key), None)
        self._target_remove(feed, target.key)

    def _keep_partial(self, feed: _Feed, target: _Target, batch: Batch | None) -> None:
        """A delivery cut short: keep how far the role said it got (saved with the others)."""
        if batch is not None and batch.done_upto is not None and batch.done_upto > target.position:
            target.position = batch.done_upto
            self._dirty[(feed.room, target.key)] = batch.done_upto
            feed.trim()

    async def _skip(self, feed: _Feed, target: _Target, *, upto: int,
                    why: str = "backlog") -> None:
        after = target.position
        await self.role.skipped(feed.room, target.key, after=after, upto=upto)
        count = upto - after
        self.stats["skipped"] += count
        metrics.RELAY_SKIPPED.labels(self.role.name).inc(count)
        if time.monotonic() - self._skip_logged_at >= SKIP_LOG_INTERVAL:
            self._skip_logged_at = time.monotonic()
            cause = ("retention pruned them" if why == "pruned"
                     else "it fell behind its backlog")
            logger.warning("a relay target skips entries: %s (%d in all so far; logged at "
                           "most every %.0fs)", cause, self.stats["skipped"], SKIP_LOG_INTERVAL,
                           extra={**self._log, "room": feed.room, "target": target.key,
                                  "after": after, "upto": upto, "backlog": self.role.backlog,
                                  "why": why})
        await self._advance(feed, target, upto)

    async def _advance(self, feed: _Feed, target: _Target, reached: int) -> None:
        """Move the target's position; it is saved with the others, or now (and before the
        next delivery) for a role that saves each."""
        if reached <= target.position:
            return
        target.position = reached
        feed.trim()
        key = (feed.room, target.key)
        self._dirty[key] = reached
        if self.role.save_interval > 0:
            return
        try:
            await database_sync_to_async(services.relay_positions_save)(
                relay=self.role.name, positions={key: reached}
            )
        except Exception:  # noqa: BLE001 - only the record of progress: kept for the next save
            self._warn("save", "could not save a relay position; will retry", exc_info=True,
                       room=feed.room, target=target.key)
            return
        if self._dirty.get(key) == reached:
            del self._dirty[key]

    async def _save(self) -> None:
        self._saved_at = time.monotonic()
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        try:
            await database_sync_to_async(services.relay_positions_save)(
                relay=self.role.name, positions=dirty
            )
        except BaseException:
            for key, seq in dirty.items():  # kept for the next save
                self._dirty[key] = max(seq, self._dirty.get(key, 0))
            raise

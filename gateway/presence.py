"""Presence: which scopes of this process are in which room, published with a heartbeat.

Each process keeps its open scopes in memory and writes them, with a heartbeat, to its own
``GatewayProcess`` row (when something changed, ``FLUSH_DELAY`` later, longer for a process
holding thousands of members: ``flush_delay``; and every ``HEARTBEAT_INTERVAL``
regardless). Readers only count processes whose heartbeat is fresh, so members of a crashed
or killed process vanish within ``PRESENCE_TIMEOUT``; a process that starts also deletes the
rows of dead ones, and, on the in-memory layer (where only one process can serve), every
other row, so a restarted gateway shows no ghosts.

Live, each change is also published to its room's group as a ``room.presence`` event
(gathered for ``DELTA_DELAY``), numbered by a per-process sequence that the row records
too. A hub serving clients that asked for presence keeps each room's roster
(``RoomRoster``): every process's members, from those events, checked against the rows every
heartbeat (a row replaces what was heard from its process only if it is at least as new, so a
lagging row never brings back someone who left; a dead process's members go with its row).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from gateway import events
from gateway import status as parts
from gateway.broadcast import presence_broadcast
from gateway.models import GatewayProcess

logger = logging.getLogger(__name__)

FLUSH_DELAY = 0.25  # changes gathered into one write, for up to FLUSH_ENTRIES members
FLUSH_ENTRIES = 1_000
FLUSH_DELAY_MAX = 2.0  # a process holding 8,000 members or more writes at most this often
DELTA_DELAY = 0.1  # joins and leaves gathered into one room.presence event per room


class PresenceTracker:
    def __init__(self, process_id: str, *, single_process: bool):
        self.process_id = process_id
        self.single_process = single_process
        self.entries: dict[str, dict[str, str]] = {}
        self._rooms: dict[str, set[str]] = {}  # room -> its scopes among entries
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._deltas_task: asyncio.Task[None] | None = None
        self.status: dict[str, dict] = {}
        self.seq = 0  # the last room.presence published
        # Changes not published yet, per room: (joined, left) by scope.
        self._deltas: dict[str, tuple[dict[str, events.PresenceMember],
                                      dict[str, events.PresenceMember]]] = {}
        self._delta_due = asyncio.Event()

    def add(self, *, scope: str, room: str, protocol: str, member_id: str, name: str) -> None:
        self.entries[scope] = {
            "scope": scope, "room": room, "protocol": protocol, "id": member_id, "name": name
        }
        self._rooms.setdefault(room, set()).add(scope)
        self._changed.set()
        joined, _ = self._deltas.setdefault(room, ({}, {}))
        joined[scope] = _member(self.entries[scope])
        self._delta_due.set()

    def remove(self, scope: str) -> None:
        entry = self.entries.pop(scope, None)
        if entry is None:
            return
        scopes = self._rooms.get(entry["room"], set())
        scopes.discard(scope)
        if not scopes:
            self._rooms.pop(entry["room"], None)
        self._changed.set()
        joined, left = self._deltas.setdefault(entry["room"], ({}, {}))
        if joined.pop(scope, None) is None:  # else it came and went unseen: nothing to say
            left[scope] = _member(entry)
        self._delta_due.set()

    def member(self, scope: str) -> events.PresenceMember | None:
        """This process's member ``scope``, if it is one."""
        entry = self.entries.get(scope)
        return None if entry is None else _member(entry)

    def room_members(self, room: str) -> list[events.PresenceMember]:
        """This process's members in ``room`` now."""
        return [_member(self.entries[scope]) for scope in self._rooms.get(room, ())]

    async def _deltas_loop(self) -> None:
        while True:
            await self._delta_due.wait()
            await asyncio.sleep(DELTA_DELAY)
            self._delta_due.clear()
            self.publish_deltas()

    def publish_deltas(self) -> None:
        """Publish the changes gathered so far, one event per room."""
        deltas, self._deltas = self._deltas, {}
        published = []
        for room, (joined, left) in deltas.items():
            if joined or left:
                self.seq += 1
                published.append(events.room_presence(
                    room=room, process=self.process_id, seq=self.seq,
                    joined=list(joined.values()), left=list(left.values())))
        presence_broadcast(list(published))

    async def start(self) -> None:
        await database_sync_to_async(self._register)()
        parts.listen(self._status_changed)
        self._changed.set()  # report the parts already running
        self._task = asyncio.create_task(self._publish_loop(), name="gateway-presence")
        self._deltas_task = asyncio.create_task(self._deltas_loop(),
                                                name="gateway-presence-deltas")

    def _status_changed(self) -> None:
        self._changed.set()  # a part came or went: report it with the next write

    async def stop(self) -> None:
        parts.unlisten(self._status_changed)
        tasks = [task for task in (self._task, self._deltas_task) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.entries.clear()
        self._rooms.clear()
        await database_sync_to_async(GatewayProcess.objects.filter(pk=self.process_id).delete)()

    async def flush(self, *, ping: bool = False) -> None:
        """Write this process's presence now, with how its parts are doing (the channel
        layer's reachability is checked again with ``ping``, once per heartbeat)."""
        self._changed.clear()
        if ping or "layer" not in self.status:
            self.status = await parts.process_status()
        else:
            self.status = {**parts.parts_status(), "layer": self.status["layer"]}
        await database_sync_to_async(self._write)(list(self.entries.values()), self.status,
                                                  self.seq)

    async def _publish_loop(self) -> None:
        interval = settings.GATEWAY["HEARTBEAT_INTERVAL"]
        while True:
            heartbeat = False
            try:
                async with asyncio.timeout(interval):
                    await self._changed.wait()
            except TimeoutError:
                heartbeat = True
            else:
                await asyncio.sleep(self.flush_delay())  # a burst of joins: one write
            try:
                await self.flush(ping=heartbeat)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("presence heartbeat failed; will retry")

    def flush_delay(self) -> float:
        """How long changes gather before they are written: ``FLUSH_DELAY``, longer as the
        process holds more members (each write carries all of them: a storm of joins into a
        process holding 10,000 would otherwise rewrite ~1 MB four times a second)."""
        scale = max(1.0, len(self.entries) / FLUSH_ENTRIES)
        return min(FLUSH_DELAY_MAX, FLUSH_DELAY * scale)

    def _register(self) -> None:
        now = timezone.now()
        presence_purge(single_process=self.single_process, keep=self.process_id)
        GatewayProcess.objects.update_or_create(
            pk=self.process_id,
            defaults={
                "hostname": socket.gethostname()[:255],
                "pid": os.getpid(),
                "started_at": now,
                "heartbeat_at": now,
                "presence": [],
            },
        )

    def _write(self, entries: list[dict[str, str]], status: dict[str, dict], seq: int) -> None:
        updated = GatewayProcess.objects.filter(pk=self.process_id).update(
            heartbeat_at=timezone.now(), presence=entries, status=status, presence_seq=seq
        )
        if not updated:  # our row was removed (for instance by a test flush): re-register
            self._register()
            self._write(entries, status, seq)


def _member(entry: dict[str, str]) -> events.PresenceMember:
    return {"scope": entry["scope"], "protocol": entry["protocol"], "id": entry["id"],
            "name": entry["name"]}


CHATS = "chats"  # the roster's pseudo-process of a room's bot chats (rows, not scopes)


class RoomRoster:
    """Who is in one room, as a hub keeps it for the clients that asked for presence: each
    process's members by scope, and the room's bot chats.

    ``apply`` and ``replace`` return what actually changed (scopes that came, scopes that
    went), which is what clients are told: a change heard twice, or both from an event and
    a row, is told once."""

    KEPT = 64  # changes kept per process, to apply again over a row older than them

    def __init__(self) -> None:
        self.members: dict[str, dict[str, events.PresenceMember]] = {}  # process -> scope -> m
        self.seqs: dict[str, int] = {}  # process -> the newest change applied
        self.recent: dict[str, deque[events.RoomPresence]] = {}  # process -> its last changes
        self.forgot: dict[str, int] = {}  # process -> the newest change no longer kept

    def apply(self, event: events.RoomPresence) -> tuple[list[events.PresenceMember],
                                                       list[events.PresenceMember]]:
        """A ``room.presence`` event (one that the process's row already covers is old)."""
        process = event["process"]
        if event["seq"] <= self.seqs.get(process, -1):
            return [], []
        self.seqs[process] = event["seq"]
        kept = self.recent.setdefault(process, deque())
        kept.append(event)
        if len(kept) > self.KEPT:
            self.forgot[process] = kept.popleft()["seq"]
        mine = self.members.setdefault(process, {})
        joined = [m for m in event["joined"] if mine.get(m["scope"]) != m]
        left = [m for m in event["left"] if m["scope"] in mine]
        for member in joined:
            mine[member["scope"]] = member
        for member in left:
            del mine[member["scope"]]
        return joined, left

    def replace(self, rows: dict[str, tuple[int, list[events.PresenceMember]]]
                ) -> tuple[list[events.PresenceMember], list[events.PresenceMember]]:
        """The processes' members as read (``{process: (seq, members)}``; a process missing
        is gone): each replaces what was heard from it, with the changes
        heard since its row was written applied again over it (what a lost change left
        wrong is mended, and a row that lags the changes brings back nobody who left).
        ``seq`` -1 always replaces (this process's own, as it holds them, and the chats)."""
        joined: list[events.PresenceMember] = []
        left: list[events.PresenceMember] = []
        for process in set(self.members) - rows.keys():
            left.extend(self.members.pop(process).values())
            for kept in (self.seqs, self.recent, self.forgot):
                kept.pop(process, None)
        for process, (seq, members) in rows.items():
            now = {member["scope"]: member for member in members}
            if 0 <= seq < self.seqs.get(process, -1):  # changes were heard since the row
                if self.forgot.get(process, -1) > seq:
                    continue  # some are no longer kept: the next row will do
                for event in self.recent.get(process, ()):
                    if event["seq"] > seq:
                        now.update((m["scope"], m) for m in event["joined"])
                        for member in event["left"]:
                            now.pop(member["scope"], None)
            elif seq >= 0:
                self.seqs[process] = seq
            before = self.members.get(process, {})
            joined.extend(m for scope, m in now.items() if before.get(scope) != m)
            left.extend(m for scope, m in before.items() if scope not in now)
            self.members[process] = now
        return joined, left

    def add(self, process: str, member: events.PresenceMember
            ) -> tuple[list[events.PresenceMember], list[events.PresenceMember]]:
        """One member of ``process`` known to be here (this process's newcomer)."""
        mine = self.members.setdefault(process, {})
        if mine.get(member["scope"]) == member:
            return [], []
        mine[member["scope"]] = member
        return [member], []

    def snapshot(self) -> list[dict[str, object]]:
        """The room's members, one per sender per protocol with their connection count."""
        return members_counted(m for members in self.members.values() for m in members.values())


def members_counted(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, object]]:
    """Members (scopes, chats) as a room shows them: one per sender per protocol, with how
    many connections it has, by protocol then name."""
    counted: dict[tuple[str, str], dict[str, object]] = {}
    for entry in entries:
        member = counted.setdefault((entry["protocol"], entry["id"]), {
            "protocol": entry["protocol"], "id": entry["id"], "name": entry["name"],
            "connections": 0})
        member["connections"] = int(member["connections"]) + 1  # type: ignore[call-overload]
    return sorted(counted.values(), key=lambda m: (str(m["protocol"]), str(m["name"])))


def presence_purge(*, single_process: bool, keep: str = "") -> int:
    """Delete the presence of dead processes: every other process on a one-process layer;
    otherwise those whose heartbeat is stale, and those of this host whose pid is gone (or
    is ours now: a restarted container), so a quick restart after a crash shows no ghosts."""
    stale = timezone.now() - timedelta(seconds=settings.GATEWAY["PRESENCE_TIMEOUT"])
    others = GatewayProcess.objects.exclude(pk=keep)
    if single_process:
        removed, _ = others.delete()
    else:
        here = others.filter(hostname=socket.gethostname()[:255]).values_list("pk", "pid")
        gone = [pk for pk, pid in here if not _pid_alive(pid)]
        removed, _ = others.filter(Q(heartbeat_at__lt=stale) | Q(pk__in=gone)).delete()
    if removed:
        logger.info("removed presence of %d dead process(es)", removed)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier process of ours with the same pid: it is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True

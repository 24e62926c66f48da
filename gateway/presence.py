"""Presence: which scopes of this process are in which room, published with a heartbeat.

Each process keeps its open scopes in memory and writes them, with a heartbeat, to its own
``GatewayProcess`` row (when something changed, ``FLUSH_DELAY`` later, longer for a process
holding thousands of members: ``flush_delay``; and every ``HEARTBEAT_INTERVAL``
regardless). Readers only count processes whose heartbeat is fresh, so members of a crashed
or killed process vanish within ``PRESENCE_TIMEOUT``; a process that starts also deletes the
rows of dead ones, and, on the in-memory layer (where only one process can serve), every
other row, so a restarted gateway shows no ghosts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from gateway import status as parts
from gateway.models import GatewayProcess

logger = logging.getLogger(__name__)

FLUSH_DELAY = 0.25  # changes gathered into one write, for up to FLUSH_ENTRIES members
FLUSH_ENTRIES = 1_000
FLUSH_DELAY_MAX = 2.0  # a process holding 8,000 members or more writes at most this often


class PresenceTracker:
    def __init__(self, process_id: str, *, single_process: bool):
        self.process_id = process_id
        self.single_process = single_process
        self.entries: dict[str, dict[str, str]] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.status: dict[str, dict] = {}

    def add(self, *, scope: str, room: str, protocol: str, member_id: str, name: str) -> None:
        self.entries[scope] = {
            "scope": scope, "room": room, "protocol": protocol, "id": member_id, "name": name
        }
        self._changed.set()

    def remove(self, scope: str) -> None:
        if self.entries.pop(scope, None) is not None:
            self._changed.set()

    async def start(self) -> None:
        await database_sync_to_async(self._register)()
        parts.listen(self._status_changed)
        self._changed.set()  # report the parts already running
        self._task = asyncio.create_task(self._publish_loop(), name="gateway-presence")

    def _status_changed(self) -> None:
        self._changed.set()  # a part came or went: report it with the next write

    async def stop(self) -> None:
        parts.unlisten(self._status_changed)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.entries.clear()
        await database_sync_to_async(GatewayProcess.objects.filter(pk=self.process_id).delete)()

    async def flush(self, *, ping: bool = False) -> None:
        """Write this process's presence now, with how its parts are doing (the channel
        layer's reachability is checked again with ``ping``, once per heartbeat)."""
        self._changed.clear()
        if ping or "layer" not in self.status:
            self.status = await parts.process_status()
        else:
            self.status = {**parts.parts_status(), "layer": self.status["layer"]}
        await database_sync_to_async(self._write)(list(self.entries.values()), self.status)

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

    def _write(self, entries: list[dict[str, str]], status: dict[str, dict]) -> None:
        updated = GatewayProcess.objects.filter(pk=self.process_id).update(
            heartbeat_at=timezone.now(), presence=entries, status=status
        )
        if not updated:  # our row was removed (for instance by a test flush): re-register
            self._register()
            self._write(entries, status)


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

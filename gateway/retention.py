"""Retention: rooms keep their messages for a number of days and/or the newest so many
(each room's policy, else ``GATEWAY_RETENTION_DAYS`` / ``GATEWAY_RETENTION_MESSAGES``;
unset: forever). A periodic job prunes what is due, in every process, but only the one
holding the ``retention`` lease works, so replicas never prune the same room at once.

Its files (attachments) go with the messages: made ``gone`` in the transaction that prunes
them, removed from the storage once it commits, and by every round's sweep otherwise, with the
files whose message never came (gateway/files.py).

Pruning moves the room's **horizon**: the cursor up to which its log is gone (messages with
their reactions, edit histories and places in bot chats, and the other entries), in small
transactions, in a thread of its own so the message path keeps the database thread. What
reads the log from before the horizon is told: the history API (``first_available``,
``pruned``), a resuming socket or stream (a ``pruned`` frame or event), and a relay target
that was that far behind (skipped, counted, told where its protocol can be).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connections

from gateway import files, selectors, services, status
from gateway.lease import Lease

logger = logging.getLogger(__name__)
T = TypeVar("T")

LEASE = "retention"
STATUS = "retention"


class Pruner:
    """The retention job of one process; ``gateway run`` starts and stops it."""

    def __init__(self, *, interval: float | None = None) -> None:
        self.interval = interval or settings.GATEWAY["RETENTION_INTERVAL"]
        # Renewed each round: another process takes over within two rounds of a death.
        self.lease = Lease(LEASE, ttl=2 * self.interval + 10.0)
        self.pruned = 0
        self.swept = 0
        self.rounds = 0
        self.last_round: float | None = None
        self._task: asyncio.Task[None] | None = None
        # Its database work runs in a thread of its own, not the one the message path uses;
        # the thread's connection is closed at the stop.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retention")

    def status(self) -> dict[str, Any]:
        return {"ready": True, "leader": self.lease.held, "pruned": self.pruned,
                "files_swept": self.swept, "last_round": self.last_round}

    async def start(self) -> None:
        status.register(STATUS, self.status)
        self._task = asyncio.create_task(self._run(), name="gateway-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.lease.release()
        await asyncio.get_running_loop().run_in_executor(self._thread, connections.close_all)
        self._thread.shutdown(wait=False)
        status.unregister(STATUS)

    def _db(self, function: Callable[..., T]) -> Callable[..., Awaitable[T]]:
        """``function`` as a database call in the job's own thread."""
        return database_sync_to_async(function, thread_sensitive=False, executor=self._thread)

    async def _run(self) -> None:
        while True:
            try:
                if await self.lease.renew():
                    await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("retention round failed; will retry",
                                 extra={"protocol": "retention"})
            await asyncio.sleep(self.interval)

    async def round(self) -> int:
        """Prune every room with something due; how many entries went. Then sweep the
        storage: files of deleted or pruned messages (removed as they go, unless the
        storage failed then), and files whose message never came."""
        rooms = await self._db(selectors.rooms_with_retention)()
        removed = 0
        for room in rooms:
            removed += await self.prune(room)
        swept = await self._db(files.attachments_sweep)()
        if swept:
            self.swept += swept
            logger.info("retention swept files from the storage",
                        extra={"protocol": "retention", "files": swept})
        self.rounds += 1
        self.last_round = time.time()
        return removed

    async def prune(self, room: str) -> int:
        due = await self._db(services.room_horizon_due)(room=room, now=time.time())
        removed, horizon = 0, -1
        while horizon < due:
            count, horizon = await self._db(services.room_prune)(room=room, upto=due)
            removed += count
        if removed:
            self.pruned += removed
            logger.info("retention pruned a room's log", extra={
                "protocol": "retention", "room": room, "horizon": due, "removed": removed})
        return removed

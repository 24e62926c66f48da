"""Group commit: the messages that arrive together are stored by one database hop.

Consumers hand their messages to the event loop's ``Committer`` (``message_post``); one task
takes whatever has queued since its last hop, up to ``BATCH_MAX``, and stores it with
``services.room_messages_post`` in one transaction (one ``UPDATE ... RETURNING`` per room, the
rows in bulk, one commit, the broadcasts published after it). A lone message goes at once,
with no timer: batches form by themselves under load, while the one before is being stored.

The queue is bounded (``QUEUE_LIMIT``): past it a message is refused as ``Busy`` (code
``unavailable``: its sender sends it again) rather than held in memory while the database is
slow. A message whose sender stopped waiting before its turn (the socket closed, the scope
was cancelled) is not stored: nobody was told it was.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter, deque

from channels.db import database_sync_to_async

from gateway import events, metrics, services
from gateway.errors import GatewayError
from gateway.services import Post

logger = logging.getLogger(__name__)

BATCH_MAX = 200  # messages stored by one database hop
QUEUE_LIMIT = 5_000  # messages waiting for their hop; past it, refused as Busy
STOP_WAIT = 5.0  # seconds the queue gets to drain at a stop


class Busy(GatewayError):
    """The gateway has more messages waiting to be stored than it holds: send it again."""

    def __init__(self) -> None:
        super().__init__("unavailable", "the gateway is busy storing messages; send it again")


class Committer:
    """The loop's one writer of messages: a queue and the task that stores it in batches."""

    def __init__(self) -> None:
        self.pending: deque[tuple[Post, asyncio.Future]] = deque()
        self.stats: Counter[str] = Counter()  # batches, messages, busy
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-committer")

    async def post(self, post: Post) -> tuple[events.RoomMessage, bool]:
        """Store ``post`` with whatever else arrives meanwhile: the event and whether it was
        created, or the GatewayError it was refused with (``Busy`` past the queue's limit);
        a database error of its batch is raised as such."""
        if len(self.pending) >= QUEUE_LIMIT:
            self.stats["busy"] += 1
            metrics.refused(post.sender["protocol"], "unavailable")
            raise Busy()
        future: asyncio.Future[tuple[events.RoomMessage, bool]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending.append((post, future))
        self._idle.clear()
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self.pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            count = min(BATCH_MAX, len(self.pending))
            batch = [self.pending.popleft() for _ in range(count)]
            batch = [(post, future) for post, future in batch if not future.done()]
            if batch:
                await self._store(batch)

    async def _store(self, batch: list[tuple[Post, asyncio.Future]]) -> None:
        self.stats["batches"] += 1
        self.stats["messages"] += len(batch)
        try:
            results = await database_sync_to_async(services.room_messages_post)(
                posts=[post for post, _ in batch]
            )
        except Exception as exc:  # noqa: BLE001 - the batch's senders handle it, as before
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, GatewayError):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def stop(self) -> None:
        """Store what is queued (briefly), then stop; what is left is refused as Busy."""
        try:
            async with asyncio.timeout(STOP_WAIT):
                await self._idle.wait()
        except TimeoutError:
            logger.warning("stopped with %d messages not stored", len(self.pending),
                           extra={"protocol": "store"})
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self.pending:
            _, future = self.pending.popleft()
            if not future.done():
                future.set_exception(Busy())


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Committer] = (
    weakref.WeakKeyDictionary()
)


def committer() -> Committer:
    """The running loop's committer, started on first use."""
    loop = asyncio.get_running_loop()
    found = _committers.get(loop)
    if found is None:
        found = _committers[loop] = Committer()
        found.start()
    return found


async def message_post(post: Post) -> tuple[events.RoomMessage, bool]:
    """Store a message through the loop's group commit (see ``Committer.post``)."""
    return await committer().post(post)


async def committer_stop() -> None:
    """Stop the running loop's committer, if it was started (a stop, a test's end)."""
    found = _committers.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.stop()

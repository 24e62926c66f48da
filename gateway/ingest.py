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
import copy
import logging
import weakref
from collections import Counter, deque

from channels.db import database_sync_to_async

from gateway import events, services
from gateway.errors import GatewayError
from gateway.services import Post

logger = logging.getLogger(__name__)

BATCH_MAX = 200  # messages stored by one database hop
QUEUE_LIMIT = 5_000  # messages waiting for their hop; past it, refused as Busy
STOP_WAIT = 5.0  # seconds the queue gets to drain at a stop


class Busy(GatewayError):
    """The gateway has more messages waiting to be stored than it holds: send it again."""

    def __init__(self, detail: str = "the gateway is busy storing messages; send it again"):
        super().__init__("unavailable", detail)


class Committer:
    """The loop's one writer of messages: a queue and the task that stores it in batches."""

    def __init__(self) -> None:
        self.pending: deque[tuple[Post, asyncio.Future]] = deque()
        self.stats: Counter[str] = Counter()  # batches, messages, busy
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._inflight: list[tuple[Post, asyncio.Future]] = []  # the batch being stored
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-committer")

    async def post(self, post: Post) -> tuple[events.RoomMessage, bool]:
        """Store ``post`` with whatever else arrives meanwhile: the event and whether it was
        created, or the GatewayError it was refused with (``Busy`` past the queue's limit);
        a database error of its batch is raised as such."""
        if len(self.pending) >= QUEUE_LIMIT or self._stopping:
            self.stats["busy"] += 1  # the sender's protocol counts its refusal
            raise Busy()
        future: asyncio.Future[tuple[events.RoomMessage, bool]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending.append((post, future))
        self._idle.clear()
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while not self._stopping:
            if not self.pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            count = min(BATCH_MAX, len(self.pending))
            batch = [self.pending.popleft() for _ in range(count)]
            self._inflight = [(post, future) for post, future in batch if not future.done()]
            try:
                if self._inflight:
                    await self._store(self._inflight)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: its senders are told, the next batch goes on
                logger.exception("a batch of messages failed", extra={"protocol": "store"})
                _fail(self._inflight, exc)
            finally:
                self._inflight = []
        self._idle.set()

    async def _store(self, batch: list[tuple[Post, asyncio.Future]]) -> None:
        self.stats["batches"] += 1
        self.stats["messages"] += len(batch)
        try:
            results = await database_sync_to_async(services.room_messages_post)(
                posts=[post for post, _ in batch]
            )
        except Exception as exc:  # noqa: BLE001 - the batch's senders handle it, as before
            return _fail(batch, exc)
        if len(results) != len(batch):
            raise RuntimeError(f"{len(results)} results for {len(batch)} messages")
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def stop(self) -> None:
        """Store what is queued (briefly), then stop: new messages are refused as Busy from
        now, and what is still waiting then too. A batch being stored is waited for (the
        database thread finishes it anyway), so its senders learn how it went."""
        try:
            async with asyncio.timeout(STOP_WAIT):
                await self._idle.wait()
        except TimeoutError:
            logger.warning("stopping with %d messages not stored yet",
                           len(self.pending) + len(self._inflight), extra={"protocol": "store"})
        self._stopping = True
        self._wakeup.set()
        _fail(list(self.pending), Busy())
        self.pending.clear()
        if self._task is not None:
            try:
                async with asyncio.timeout(STOP_WAIT):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                _fail(self._inflight, Busy())  # the database may still store them


def _fail(batch: list[tuple[Post, asyncio.Future]], exc: Exception) -> None:
    """Tell each sender of ``batch`` still waiting that it failed (each its own copy of the
    exception, so their tracebacks do not pile up on one object)."""
    for _, future in batch:
        if not future.done():
            try:
                mine = copy.copy(exc)
            except Exception:  # noqa: BLE001 - one that cannot be copied is shared
                mine = exc
            mine.__cause__ = exc.__cause__
            future.set_exception(mine)


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Committer] = (
    weakref.WeakKeyDictionary()
)


_stopped: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def committer() -> Committer:
    """The running loop's committer, started on first use (and again if its task ended:
    a bug must not leave every later message waiting). ``Busy`` once the loop's committer
    was stopped."""
    loop = asyncio.get_running_loop()
    if loop in _stopped:
        raise Busy()
    found = _committers.get(loop)
    if found is None or not found.running:
        found = _committers[loop] = Committer()
        found.start()
    return found


async def message_post(post: Post) -> tuple[events.RoomMessage, bool]:
    """Store a message through the loop's group commit (see ``Committer.post``)."""
    return await committer().post(post)


async def committer_stop() -> None:
    """Stop the running loop's committer, if it was started (a stop, a test's end); the loop
    gets no new one."""
    loop = asyncio.get_running_loop()
    _stopped.add(loop)
    found = _committers.pop(loop, None)
    if found is not None:
        await found.stop()

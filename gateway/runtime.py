"""The process's long-running parts (fan-out hub, presence), one set per event loop.

They start on first use, so the gateway works under any ASGI server and in tests, and
``gateway run`` stops them at shutdown (closing every open scope first).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref

from channels.layers import InMemoryChannelLayer, get_channel_layer

from gateway.broadcast import Publisher, publisher_install
from gateway.fanout import END_SHUTDOWN, RoomHub
from gateway.ingest import committer_stop
from gateway.presence import PresenceTracker

logger = logging.getLogger(__name__)

class Runtime:
    def __init__(self) -> None:
        self.process_id = uuid.uuid4().hex
        layer = get_channel_layer()
        self.presence = PresenceTracker(
            self.process_id, single_process=isinstance(layer, InMemoryChannelLayer)
        )
        self.hub = RoomHub(layer, process_id=self.process_id,
                           local_members=self.presence.room_members,
                           local_member=self.presence.member)

    async def start(self) -> None:
        self.publisher = Publisher(asyncio.get_running_loop())
        self.publisher.start()
        publisher_install(self.publisher)
        await self.presence.start()
        await self.hub.start()
        logger.info("gateway runtime started", extra={"process_id": self.process_id})

    async def stop(self) -> None:
        """Close every open scope, then leave the layer and remove our presence."""
        subscribers = self.hub.subscribers()
        await asyncio.gather(
            *(sub.end(END_SHUTDOWN) for sub in subscribers), return_exceptions=True
        )
        publisher_install(None)
        await self.publisher.stop()
        await self.hub.stop()
        await self.presence.stop()
        logger.info(
            "gateway runtime stopped",
            extra={"process_id": self.process_id, "closed": len(subscribers)},
        )


_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[Runtime]] = (
    weakref.WeakKeyDictionary()
)
_stopped: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


class ShuttingDown(RuntimeError):
    """The process is stopping: no new scope may join a room."""


async def get_runtime() -> Runtime:
    """The running loop's runtime, started on first use."""
    loop = asyncio.get_running_loop()
    if loop in _stopped:
        raise ShuttingDown("the gateway is shutting down")
    task = _runtimes.get(loop)
    if task is None or (task.done() and task.exception() is not None):
        task = _runtimes[loop] = loop.create_task(_start(), name="gateway-runtime-start")
    return await asyncio.shield(task)


async def _start() -> Runtime:
    runtime = Runtime()
    await runtime.start()
    return runtime


async def stop_runtime() -> None:
    """Stop the running loop's runtime, if it was started (and its group commit, once the
    scopes that post are closed); the loop gets no new one."""
    loop = asyncio.get_running_loop()
    _stopped.add(loop)
    await committer_stop()  # first, so what it stores is still published by the runtime
    task = _runtimes.pop(loop, None)
    if task is not None and task.done() and task.exception() is None:
        await task.result().stop()

"""Application instances that a protocol server opens on the root ASGI application.

Like daphne for a socket, a protocol server gives each of its scopes a queue of events in
and a ``send`` callable out, and runs the application as a task until the scope ends. The
events are each protocol's TypedDicts (protocols/<protocol>/events.py): ``Scope[E]`` takes
events of type ``E``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gateway.logging import scope_log

logger = logging.getLogger(__name__)

# What a scope takes. Contravariant: a scope that takes more kinds of event serves where
# fewer are put (every role of a protocol takes its disconnect, which scopes_close puts).
E = TypeVar("E", contravariant=True)
Sent = TypeVar("Sent")  # what the application sends the server


@dataclass
class Scope(Generic[E]):
    scope: dict
    queue: asyncio.Queue[Any]  # read only by the application, as its ASGI ``receive``
    task: asyncio.Task | None = None
    last_seen: float = field(default_factory=time.monotonic)
    pending: int = 0  # events the server awaits an answer for (a device's unacknowledged)
    closing: bool = False

    def put(self, event: E) -> None:
        self.queue.put_nowait(event)

    def close(self, event: E) -> None:
        """Send the instance its disconnect ``event``, once."""
        if not self.closing:
            self.closing = True
            self.put(event)


def scope_open(
    application,
    scope: dict,
    send: Callable[[Sent], Awaitable[None]],
    *,
    first: E,
    name: str,
    on_exit: Callable[[Scope[E], BaseException | None], None],
) -> Scope[E]:
    """Start an application instance for ``scope``, fed ``first`` and then what is put.

    ``on_exit`` is called when the instance ends, with the exception it failed with (logged
    here), or None.
    """
    opened: Scope[E] = Scope(scope=scope, queue=asyncio.Queue())
    opened.put(first)

    async def run() -> None:
        failure: BaseException | None = None
        try:
            await application(scope, opened.queue.get, send)
        except Exception as exc:
            failure = exc
            logger.exception(
                "%s application instance failed", scope["type"],
                extra=scope_log(scope["type"], scope.get("room"), name),
            )
        finally:
            on_exit(opened, failure)

    # A context of its own, as daphne gives each connection: a scope opened while handling a
    # request (Telegram's webhook) must not inherit that request's executor, which ends
    # with it.
    opened.task = asyncio.create_task(run(), name=name, context=contextvars.Context())
    return opened


async def scopes_close(scopes: list[Scope[E]], event: E, *, wait: float) -> None:
    """Send each scope ``event`` (its disconnect) and wait a while for them to end."""
    for opened in scopes:
        opened.put(event)
    tasks = [opened.task for opened in scopes if opened.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=wait)


async def scopes_cancel(scopes: list[Scope[Any]], *, wait: float = 2.0) -> None:
    """Cancel the instances still running (after ``scopes_close``), and wait a while."""
    tasks = [opened.task for opened in scopes if opened.task is not None and not opened.task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=wait)

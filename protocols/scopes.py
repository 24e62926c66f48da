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


K = TypeVar("K")
S = TypeVar("S", bound=Scope[Any])


class ScopeRegistry(Generic[K, S]):
    """A protocol server's open scopes of one kind, by key (a device in a room, a chat, a
    room's relay): the one place that opens them on demand, forgets them when they end, and
    finds the idle ones. Both servers (MQTT, Telegram) keep theirs here."""

    def __init__(self, *, on_count: Callable[[int], None] | None = None) -> None:
        self._scopes: dict[K, S] = {}
        self._on_count = on_count  # told the number of open scopes when it changes

    def __len__(self) -> int:
        return len(self._scopes)

    def __contains__(self, key: object) -> bool:
        return key in self._scopes

    def get(self, key: K) -> S | None:
        return self._scopes.get(key)

    def keys(self):
        return self._scopes.keys()

    def values(self) -> list[S]:
        return list(self._scopes.values())

    def open(self, key: K, opener: Callable[[], S]) -> S:
        """The scope for ``key``, opened by ``opener`` if there is none."""
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._scopes[key] = opener()
            self._count()
        return scope

    def ended(self, key: K, scope: object) -> bool:
        """Forget ``scope`` (it ended) if it is still the one for ``key``; whether it was."""
        if self._scopes.get(key) is not scope:
            return False
        del self._scopes[key]
        self._count()
        return True

    def idle(self, idle_timeout: float) -> list[tuple[K, S]]:
        """The scopes unused for ``idle_timeout`` seconds with nothing pending; the caller
        closes them (and may forget them at once with ``ended``)."""
        cutoff = time.monotonic() - idle_timeout
        return [(key, scope) for key, scope in self._scopes.items()
                if scope.last_seen < cutoff and not scope.pending]

    def take_all(self) -> list[S]:
        """Forget and return every scope (a stop, a lost lease)."""
        taken = list(self._scopes.values())
        self._scopes.clear()
        if taken:
            self._count()
        return taken

    def _count(self) -> None:
        if self._on_count is not None:
            self._on_count(len(self._scopes))

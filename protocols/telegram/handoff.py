"""Updates that reach this process over HTTP for its Telegram server.

Telegram's webhook posts to a route of the web server (protocols/telegram/webhook.py), while
the bot runs in the Telegram server: the server registers a handler here when it starts, and
the view hands it each update. The handler returns once the update is handled (stored), so the
HTTP answer tells the sender whether to deliver it again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

Handler = Callable[[dict], Awaitable[None]]

_handlers: dict[str, Handler] = {}


class Rejected(ValueError):
    """An update the handler cannot read (the view answers 400)."""


class Unavailable(RuntimeError):
    """The handler cannot take updates now (the view answers 503; the sender retries)."""


def register(name: str, handler: Handler) -> None:
    _handlers[name] = handler


def unregister(name: str, handler: Handler) -> None:
    if _handlers.get(name) == handler:  # a bound method is a new object on each access
        del _handlers[name]


def handler(name: str) -> Handler | None:
    return _handlers.get(name)

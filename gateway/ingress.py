"""Updates that reach this process over HTTP for one of its protocol servers.

Telegram's webhook posts to a route of the web server (gateway/views.py), while the bot runs
in protocols/telegram: the protocol server registers a handler here when it starts, and the
view hands it each update. The handler returns once the update is handled (stored), so the
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
    if _handlers.get(name) is handler:
        del _handlers[name]


def handler(name: str) -> Handler | None:
    return _handlers.get(name)

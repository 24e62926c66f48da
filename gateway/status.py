"""How this process is doing, part by part: for ``/readyz``, the heartbeat and the dashboard.

The web server and each protocol server register a provider returning ``{"ready": bool,
...details}`` when they start (nothing here imports them); the database and the channel
layer are checked here. The heartbeat (gateway/presence.py) stores the result in the
process's row, so the dashboard shows every replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.db import connection

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0

Provider = Callable[[], dict]
_providers: dict[str, Provider] = {}
_listeners: list[Callable[[], None]] = []  # told when a part comes or goes


def register(name: str, provider: Provider) -> None:
    _providers[name] = provider
    _notify()


def unregister(name: str) -> None:
    if _providers.pop(name, None) is not None:
        _notify()


def listen(listener: Callable[[], None]) -> None:
    _listeners.append(listener)


def unlisten(listener: Callable[[], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _notify() -> None:
    for listener in list(_listeners):
        listener()


def _database_check() -> dict:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return {"ready": True, "vendor": connection.vendor}


async def database_status() -> dict:
    try:
        return await asyncio.wait_for(
            database_sync_to_async(_database_check)(), CHECK_TIMEOUT
        )
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return {"ready": False, "error": str(exc)[:200]}


async def layer_status() -> dict:
    """The channel layer: in-memory (always there) or Redis (answers a PING)."""
    if isinstance(get_channel_layer(), InMemoryChannelLayer):
        return {"ready": True, "backend": "in-memory"}
    import redis.asyncio as redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=CHECK_TIMEOUT,
                                  socket_connect_timeout=CHECK_TIMEOUT)
    try:
        await asyncio.wait_for(client.ping(), CHECK_TIMEOUT)
        return {"ready": True, "backend": "redis"}
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        return {"ready": False, "backend": "redis", "error": str(exc)[:200]}
    finally:
        await client.aclose()


def parts_status() -> dict[str, dict]:
    """What the registered parts report about themselves."""
    parts = {}
    for name, provider in list(_providers.items()):
        try:
            parts[name] = provider()
        except Exception as exc:  # noqa: BLE001 - a broken provider is a not-ready part
            logger.exception("status provider failed", extra={"part": name})
            parts[name] = {"ready": False, "error": str(exc)[:200]}
    return parts


async def process_status(*, database: bool = False) -> dict[str, dict]:
    """Every part of this process: the registered ones and the channel layer (and the
    database, when asked: the heartbeat that stores this has just reached it)."""
    status = {**parts_status(), "layer": await layer_status()}
    if database:
        status["database"] = await database_status()
    return status

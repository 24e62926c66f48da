"""A role that one gateway process at a time holds (a relay role, polling Telegram).

The lease lives in the database (``services.lease_acquire``): the holder renews it well
within its time to live; another process takes it once it expires. A holder that cannot
tell whether its renewal went through (the database slow or failing) keeps the role only
while its last renewal surely still holds, so two processes never act at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from datetime import datetime

from channels.db import database_sync_to_async
from django.db import DatabaseError

from gateway import services

logger = logging.getLogger(__name__)

TTL = 10.0


class Lease:
    def __init__(self, name: str, *, ttl: float = TTL) -> None:
        self.name = name
        self.ttl = ttl
        self.holder = uuid.uuid4().hex  # this process
        self.held = False
        # When this process took the lease over, when it had expired: how long the role
        # went without a holder (None: never held before, or it held it already).
        self.vacant_since: datetime | None = None
        self._renewed_at = 0.0

    async def renew(self) -> bool:
        """Take or renew the lease; whether this process holds it now."""
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose the caller's
            # cancellation, and a stopping loop would go on.
            async with asyncio.timeout(self.ttl / 4):
                held, vacant_since = await database_sync_to_async(services.lease_acquire)(
                    name=self.name, holder=self.holder, ttl=self.ttl
                )
        except (TimeoutError, DatabaseError) as exc:
            held = self.held and time.monotonic() - self._renewed_at < self.ttl / 2
            logger.warning("could not renew the %s lease (%s)", self.name, exc or "timed out",
                           extra={"lease": self.name})
        else:
            if held:
                self._renewed_at = time.monotonic()
                if not self.held:
                    self.vacant_since = vacant_since
        self.held = held
        return held

    async def release(self) -> None:
        """Hand the lease over at once (a clean stop), rather than let it expire."""
        if not self.held:
            return
        self.held = False
        try:
            await database_sync_to_async(services.lease_release)(
                name=self.name, holder=self.holder
            )
        except DatabaseError:
            logger.warning("could not release the %s lease; it expires", self.name,
                           extra={"lease": self.name})


def jitter(delay: float) -> float:
    """A retry delay spread over half to one and a half times ``delay``."""
    return delay * (0.5 + random.random())  # noqa: S311 (not for security)

"""A token bucket: the per-connection flood limit of every protocol."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Allow ``burst`` events at once and ``rate`` per second sustained."""

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until the next event would be allowed."""
        return max(0.0, (1.0 - self._tokens) / self.rate)


def flood_limit() -> TokenBucket:
    """A connection's flood limit, as configured (the same for every protocol)."""
    from django.conf import settings

    return TokenBucket(
        rate=settings.GATEWAY["RATE_LIMIT_PER_SECOND"], burst=settings.GATEWAY["RATE_LIMIT_BURST"]
    )

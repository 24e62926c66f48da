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
        self._extra = 0.0  # tokens given back beyond the burst (see credit), until:
        self._extra_until = 0.0

    def allow(self, now: float | None = None) -> bool:
        """Spend a token for an event at ``now`` (default: the clock's now).

        A protocol server passes the time the event arrived, so what waited in the
        gateway's own queues is not counted against its sender; a time earlier than the
        last one refills nothing (events are counted in the order they are handled).
        """
        now = self._clock() if now is None else now
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._stamp = max(self._stamp, now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        if self._extra >= 1.0 and now < self._extra_until:
            self._extra -= 1.0
            return True
        return False

    def credit(self, seconds: float, now: float | None = None) -> None:
        """Give back ``seconds`` of refill beyond the burst, usable for as long again.

        For time the gateway itself made a sender wait (a store that stalled): the sender's
        broker held back what it sent meanwhile and delivers it all at once afterwards.
        """
        now = self._clock() if now is None else now
        if now >= self._extra_until:
            self._extra = 0.0
        self._extra += seconds * self.rate
        self._extra_until = max(self._extra_until, now + seconds)

    def retry_after(self) -> float:
        """Seconds until the next event would be allowed."""
        return max(0.0, (1.0 - self._tokens) / self.rate)


def flood_limit() -> TokenBucket:
    """A connection's flood limit, as configured (the same for every protocol)."""
    from django.conf import settings

    return TokenBucket(
        rate=settings.GATEWAY["RATE_LIMIT_PER_SECOND"], burst=settings.GATEWAY["RATE_LIMIT_BURST"]
    )

"""Per-caller token buckets (in memory, per replica)."""
from __future__ import annotations

import time


class RateLimiter:
    def __init__(self, rate_per_second: float, burst: float, *, max_callers: int = 100000, clock=time.monotonic):
        self.rate = float(rate_per_second)
        self.burst = float(burst)
        self.max_callers = max_callers
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}  # caller -> [tokens, last refill]

    def allow(self, caller: str) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be allowed)."""
        now = self.clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self.max_callers:
                self._forget_full(now)
            bucket = self._buckets[caller] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True, 0.0
        bucket[0] = tokens
        return False, (1.0 - tokens) / self.rate if self.rate > 0 else 60.0

    def _forget_full(self, now: float) -> None:
        # Buckets that have refilled completely carry no state worth keeping.
        full = [c for c, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.burst]
        for caller in full:
            del self._buckets[caller]
        if len(self._buckets) >= self.max_callers:
            self._buckets.clear()

"""Client-side politeness: token-bucket limits on requests/min and tokens/min, and retry delays."""
from __future__ import annotations

import asyncio
import random
import time
from typing import Optional


class _Bucket:
    """`rate` units per minute, bursts up to one minute's worth."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 = take it now)."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        amount = min(amount, self.capacity)  # a request larger than the bucket waits for a full one
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate


class RateLimiter:
    def __init__(self, requests_per_minute: Optional[float] = None, tokens_per_minute: Optional[float] = None):
        self.requests = _Bucket(requests_per_minute) if requests_per_minute else None
        self.tokens = _Bucket(tokens_per_minute) if tokens_per_minute else None
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: float) -> None:
        """Wait until one request of about `tokens` tokens fits both limits."""
        async with self._lock:  # first come, first served
            for bucket, amount in ((self.requests, 1.0), (self.tokens, tokens)):
                while bucket is not None:
                    delay = bucket.wait_for(amount)
                    if delay <= 0:
                        break
                    await asyncio.sleep(delay)


def backoff_delay(attempt: int, base: float, cap: float = 60.0, retry_after: Optional[float] = None,
                  rng: random.Random = random.Random()) -> float:
    """Exponential backoff with full jitter in [0.5, 1.5) x base x 2^attempt, capped; a server's
    Retry-After is a floor (waiting less would only earn another 429)."""
    delay = min(cap, base * (2 ** attempt)) * rng.uniform(0.5, 1.5)
    return max(delay, retry_after or 0.0)

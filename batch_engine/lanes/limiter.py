"""Client-side rate limits for the realtime lane: RPM, ITPM and OTPM token buckets that refill continuously,
seeded from config and corrected from every response's `anthropic-ratelimit-*` headers.

The API enforces its limits as token buckets too, so a client that mirrors them (and believes the server over
its own seed) converges on the real limit without a storm of 429s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

_HEADER_BUCKETS = {"requests": "rpm", "input-tokens": "itpm", "output-tokens": "otpm"}


class Bucket:
    """`limit` units per minute, refilled continuously; may go negative when a charge overshoots."""

    def __init__(self, limit: float, now: float) -> None:
        self.limit = float(limit)
        self.level = float(limit)
        self._at = now

    def refill(self, now: float) -> None:
        if now > self._at:
            self.level = min(self.limit, self.level + (now - self._at) * self.limit / 60.0)
            self._at = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available; a request larger than the bucket needs it full."""
        self.refill(now)
        needed = min(amount, self.limit)
        return 0.0 if self.level >= needed else (needed - self.level) * 60.0 / self.limit

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def correct(self, limit: float, remaining: float, now: float) -> None:
        """Adopt the server's limit and never believe we have more left than it says."""
        self.refill(now)
        if limit > 0:
            self.limit = float(limit)
        self.level = min(self.level, float(remaining), self.limit)


@dataclass(frozen=True, slots=True)
class Permit:
    """What `acquire` charged, so `settle` can correct it with the real usage."""

    input_tokens: int


class RateLimiter:
    """The RPM, ITPM and OTPM buckets of one model class."""

    def __init__(
        self,
        rpm: int,
        itpm: int,
        otpm: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self.buckets = {"rpm": Bucket(rpm, now), "itpm": Bucket(itpm, now), "otpm": Bucket(otpm, now)}
        self._paused_until = 0.0

    def _wait(self, input_tokens: int, now: float) -> float:
        waits = [
            self._paused_until - now,
            self.buckets["rpm"].wait_for(1, now),
            self.buckets["itpm"].wait_for(input_tokens, now),
            # Output is unknown up front (max_tokens does not count toward OTPM): wait only while it is spent.
            self.buckets["otpm"].wait_for(1, now),
        ]
        return max(waits)

    async def acquire(self, input_tokens: int) -> Permit:
        """Wait until one request with `input_tokens` uncached input fits every bucket, then take it."""
        while True:
            now = self._clock()
            wait = self._wait(input_tokens, now)
            if wait <= 0:
                self.buckets["rpm"].take(1, now)
                self.buckets["itpm"].take(input_tokens, now)
                return Permit(input_tokens)
            await self._sleep(wait)

    def settle(self, permit: Permit, input_tokens: int, output_tokens: int) -> None:
        """Charge the real usage: input that counts toward ITPM (cache reads do not) and output tokens."""
        now = self._clock()
        self.buckets["itpm"].take(input_tokens - permit.input_tokens, now)
        self.buckets["otpm"].take(output_tokens, now)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Correct every bucket from a response's `anthropic-ratelimit-<kind>-limit/remaining` headers."""
        now = self._clock()
        for kind, name in _HEADER_BUCKETS.items():
            limit = headers.get(f"anthropic-ratelimit-{kind}-limit")
            remaining = headers.get(f"anthropic-ratelimit-{kind}-remaining")
            if limit is None or remaining is None:
                continue
            try:
                self.buckets[name].correct(float(limit), float(remaining), now)
            except ValueError:
                continue

    def pause(self, seconds: float) -> None:
        """A 429 means the server's bucket is empty: every worker holds off, not just the one that got it."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        rpm = self.buckets["rpm"]
        rpm.level = min(rpm.level, 0.0)

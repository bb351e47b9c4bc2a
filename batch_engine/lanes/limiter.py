"""Client-side rate limits for the realtime lane: RPM, ITPM and OTPM token buckets that refill continuously,
seeded from config and corrected from every response's `anthropic-ratelimit-*` headers.

The API enforces its limits as token buckets too, so a client that mirrors them (and believes the server over
its own seed) converges on the real limit without a storm of 429s. A 429 holds every request of the model only
when the evidence says the server's capacity is gone (see `RateLimiter.rate_limited`): a 429 can also be a
transient refusal with room left, and pausing 32 workers for each of those costs more than the faults do.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

_HEADER_BUCKETS = {"requests": "rpm", "input-tokens": "itpm", "output-tokens": "otpm"}
# Refill is float arithmetic: a bucket can come out a hair short of what it should hold after a computed wait,
# which would ask for another wait of femtoseconds (forever, on a clock that cannot advance by so little).
_EPSILON = 1e-6
# Recent answers remembered per model, and how many of them must be 429s for the server to be refusing as a rule
# rather than now and then (or 5xx for it to be failing as a rule). At a 12 % rate of stray 429s (30 % faults),
# 8 of 16 happens about once in 10 runs of 1,000 tasks; a real limit reached, or an API overloaded, with 32
# requests in flight gets there within one round trip.
_RECENT_ANSWERS = 16
_REFUSING = 8
# While most answers succeed, a 5xx is bad luck, not the API's state: its retries back off only this far (the
# policy's steps 1 and 2: 0.25-0.5 s, then 0.5-1 s) instead of doubling up to half a minute.
_STRAY_FAILURE_STEP = 2


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
        return 0.0 if self.level >= needed - _EPSILON else (needed - self.level) * 60.0 / self.limit

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
    """What `acquire` charged, so `settle` can correct it with the real usage, and when: the headers of its
    response describe the server's buckets as they were when it arrived, before anything sent after it."""

    input_tokens: int
    at: float = 0.0
    taken: Mapping[str, float] = field(default_factory=dict)  # the limiter's running totals, this one included


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
        # Running totals of what acquire took: what was sent after a given request is the difference.
        self._taken = {"rpm": 0.0, "itpm": 0.0}
        self._recent: deque[str] = deque(maxlen=_RECENT_ANSWERS)  # recent answers: "ok", "429" or "5xx"

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
                self._taken["rpm"] += 1
                self._taken["itpm"] += input_tokens
                return Permit(input_tokens, now, dict(self._taken))
            await self._sleep(wait)

    def settle(self, permit: Permit, input_tokens: int, output_tokens: int) -> None:
        """Charge the real usage: input that counts toward ITPM (cache reads do not) and output tokens."""
        now = self._clock()
        self.buckets["itpm"].take(input_tokens - permit.input_tokens, now)
        self.buckets["otpm"].take(output_tokens, now)
        self._recent.append("ok")

    def observe(self, headers: Mapping[str, str], permit: Permit | None = None) -> None:
        """Correct every bucket from a response's `anthropic-ratelimit-<kind>-limit/remaining` headers.

        With the request's `permit`, the server's figure is first brought up to now: refilled for the time since
        the request was sent, less what was sent after it (in flight or answered, the header does not count it).
        Without that, every answer at the end of a burst says there is room for the requests already on the wire.
        """
        now = self._clock()
        for kind, name in _HEADER_BUCKETS.items():
            try:
                limit = float(headers[f"anthropic-ratelimit-{kind}-limit"])
                remaining = float(headers[f"anthropic-ratelimit-{kind}-remaining"])
            except (KeyError, ValueError):
                continue
            if permit is not None and name in permit.taken and limit > 0:
                refilled = min(limit, remaining + max(0.0, now - permit.at) * limit / 60.0)
                remaining = refilled - (self._taken[name] - permit.taken[name])
            self.buckets[name].correct(limit, remaining, now)

    def rate_limited(self, headers: Mapping[str, str], permit: Permit, retry_after_s: float) -> bool:
        """Weigh a 429 that is not a spend limit (after `observe` took in its headers); True when it holds every
        request of the model, not just the one that got it (which waits under the retry policy either way).

        Capacity is gone when the 429's own headers show a bucket without room for the request: the buckets,
        just corrected from those headers, then hold every request until they have refilled, and no longer. Or
        when most recent answers were 429s, whatever the headers say (a limit they do not show, an estimate
        below the server's count): everyone waits the retry-after. A 429 that shows room left, or a lone one
        without headers, is not evidence that the bucket is empty: only its own request is delayed.
        """
        self._recent.append("429")
        if self._recent.count("429") >= _REFUSING:
            self._recent.clear()
            self.pause(retry_after_s)
            return True
        needs = {"requests": 1.0, "input-tokens": float(permit.input_tokens), "output-tokens": 1.0}
        for kind, need in needs.items():
            try:
                limit = float(headers[f"anthropic-ratelimit-{kind}-limit"])
                remaining = float(headers[f"anthropic-ratelimit-{kind}-remaining"])
            except (KeyError, ValueError):
                continue
            if remaining < min(need, limit):
                return True
        return False

    def server_error(self) -> None:
        """Note a 5xx answer (or a failed connection): it holds no one, but a run of them slows every retry."""
        self._recent.append("5xx")

    def failures_are_strays(self) -> bool:
        """True while most recent answers succeed: a failure now is one request's bad luck, not the API's state.
        False until enough answers have come back to tell."""
        return len(self._recent) >= _RECENT_ANSWERS // 2 and self._recent.count("5xx") < _REFUSING

    def backoff_step(self, attempt: int) -> int:
        """The backoff step for retry number `attempt`: the attempt itself (exponential growth) while the API is
        failing as a rule, at most `_STRAY_FAILURE_STEP` while failures are strays."""
        return min(attempt, _STRAY_FAILURE_STEP) if self.failures_are_strays() else attempt

    def pause(self, seconds: float) -> None:
        """Every worker holds off for `seconds`, not just the one that got the 429 (the server is refusing)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        rpm = self.buckets["rpm"]
        rpm.level = min(rpm.level, 0.0)

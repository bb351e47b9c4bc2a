"""Token buckets with continuous refill (RPM, ITPM, OTPM per model; one RPM for all batch endpoints).

Buckets run on wall time (time.monotonic): a rate limit is about what a client achieves per real minute,
whatever speed the emulator's batch clock runs at.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from batch_engine.emulator.settings import EmulatorSettings
from batch_engine.emulator.wire import rfc3339

# Reported when a limit is off, so a client that follows the headers does not throttle itself.
UNLIMITED = {"requests": 1_000_000, "input-tokens": 1_000_000_000, "output-tokens": 1_000_000_000}


class TokenBucket:
    """`limit` per minute, refilled continuously, starting full; may go negative when a charge overshoots."""

    def __init__(self, limit_per_minute: int, now: float) -> None:
        self.limit = limit_per_minute
        self._rate = limit_per_minute / 60.0
        self._level = float(limit_per_minute)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._level = min(float(self.limit), self._level + (now - self._at) * self._rate)
            self._at = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0 if now); a request bigger than the bucket needs it full."""
        self._refill(now)
        needed = min(amount, float(self.limit))
        return 0.0 if self._level >= needed else (needed - self._level) / self._rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self._level -= amount

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self._level))

    def seconds_to_full(self, now: float) -> float:
        self._refill(now)
        return (self.limit - self._level) / self._rate


@dataclass(frozen=True, slots=True)
class Refusal:
    limit_name: str  # "requests", "input-tokens" or "output-tokens"
    limit: int
    retry_after_s: float

    def message(self) -> str:
        unit = {"requests": "requests", "input-tokens": "input tokens", "output-tokens": "output tokens"}
        return (
            f"This request would exceed your organization's rate limit of {self.limit:,} "
            f"{unit[self.limit_name]} per minute. Retry after {math.ceil(self.retry_after_s)} s."
        )


class RateLimitBuckets:
    """All buckets of one emulator. Buckets for a model are created on its first request."""

    def __init__(self, settings: EmulatorSettings) -> None:
        self._settings = settings
        self._models: dict[str, dict[str, TokenBucket]] = {}
        self._batch: TokenBucket | None = None
        self._count: TokenBucket | None = None
        self.reconfigure(settings)

    def reconfigure(self, settings: EmulatorSettings) -> None:
        """Apply new limits; buckets start full again."""
        now = time.monotonic()
        self._settings = settings
        self._models = {}
        self._batch = TokenBucket(settings.batch_rpm, now) if settings.batch_rpm else None
        self._count = TokenBucket(settings.count_tokens_rpm, now) if settings.count_tokens_rpm else None

    def _buckets(self, model: str) -> dict[str, TokenBucket]:
        buckets = self._models.get(model)
        if buckets is None:
            now = time.monotonic()
            limits = {
                "requests": self._settings.rpm,
                "input-tokens": self._settings.itpm,
                "output-tokens": self._settings.otpm,
            }
            buckets = {name: TokenBucket(limit, now) for name, limit in limits.items() if limit}
            self._models[model] = buckets
        return buckets

    def admit_message(self, model: str, input_tokens: int) -> Refusal | None:
        """Take one request and its input tokens, or say which limit refuses and for how long."""
        buckets = self._buckets(model)
        now = time.monotonic()
        # Output is not known yet; OTPM only refuses while the bucket is empty (output is charged after).
        needs = {"requests": 1.0, "input-tokens": float(input_tokens), "output-tokens": 1.0}
        worst: Refusal | None = None
        for name, bucket in buckets.items():
            wait = bucket.wait_for(needs[name], now)
            if wait > 0 and (worst is None or wait > worst.retry_after_s):
                worst = Refusal(name, bucket.limit, wait)
        if worst is not None:
            return worst
        if "requests" in buckets:
            buckets["requests"].take(1, now)
        if "input-tokens" in buckets:
            buckets["input-tokens"].take(input_tokens, now)
        return None

    def charge_output(self, model: str, output_tokens: int) -> None:
        bucket = self._buckets(model).get("output-tokens")
        if bucket is not None:
            bucket.take(output_tokens, time.monotonic())

    def admit_simple(self, which: str) -> Refusal | None:
        """The batch endpoints' or count_tokens' own RPM."""
        bucket = self._batch if which == "batches" else self._count
        if bucket is None:
            return None
        now = time.monotonic()
        wait = bucket.wait_for(1, now)
        if wait > 0:
            return Refusal("requests", bucket.limit, wait)
        bucket.take(1, now)
        return None

    def batch_headers(self) -> dict[str, str]:
        """anthropic-ratelimit-requests-* for a Batches response: the batch endpoints' own RPM (all of them,
        polling included, share it; docs: /api/rate-limits, Message Batches). Absent when unlimited."""
        bucket = self._batch
        if bucket is None:
            return {}
        now = time.monotonic()
        return {
            "anthropic-ratelimit-requests-limit": str(bucket.limit),
            "anthropic-ratelimit-requests-remaining": str(bucket.remaining(now)),
            "anthropic-ratelimit-requests-reset": rfc3339(time.time() + bucket.seconds_to_full(now)),
        }

    def headers(self, model: str) -> dict[str, str]:
        """anthropic-ratelimit-* headers for a Messages response (reset times are RFC 3339, wall clock)."""
        buckets = self._buckets(model)
        now = time.monotonic()
        wall = time.time()
        headers: dict[str, str] = {}
        tightest: tuple[float, str] | None = None
        now_text = rfc3339(wall)  # the reset of every limit that is off
        for name in ("requests", "input-tokens", "output-tokens"):
            bucket = buckets.get(name)
            prefix = f"anthropic-ratelimit-{name}"
            if bucket is None:
                limit = remaining = UNLIMITED[name]
                reset = now_text
            else:
                limit, remaining = bucket.limit, bucket.remaining(now)
                reset = rfc3339(wall + bucket.seconds_to_full(now))
                if name != "requests" and (tightest is None or remaining / limit < tightest[0]):
                    tightest = (remaining / limit, name)
            headers[f"{prefix}-limit"] = str(limit)
            headers[f"{prefix}-remaining"] = str(remaining)
            headers[f"{prefix}-reset"] = reset
        # tokens-* shows the most restrictive token limit in effect.
        source = tightest[1] if tightest is not None else "input-tokens"
        for field in ("limit", "remaining", "reset"):
            headers[f"anthropic-ratelimit-tokens-{field}"] = headers[f"anthropic-ratelimit-{source}-{field}"]
        return headers

"""Injected faults: seeded random rates per request, and scripted one-shots for exact test scenarios."""

from __future__ import annotations

import random
from collections import deque
from typing import Literal, get_args

from batch_engine.emulator.settings import ENDPOINTS, EmulatorSettings
from batch_engine.emulator.wire import ApiFailure

FaultKind = Literal[
    "429",
    "529",
    "500",
    "drop",
    "error_event",
    "spend_limit",
    "spend_limit_400",
    "spend_limit_402",
    "500_no_retry",
    "after_commit",
    "after_commit_no_retry",
]
# Endpoints whose request can take effect and still fail: the batch is created, or the message answered and
# billed, and then the client gets a 500 or 529. The API documents no idempotency key for either, so a client
# cannot tell this from a failure before the work (the API docs, "Errors": 500/529 say nothing of whether the
# request was processed).
AFTER_COMMIT_ENDPOINTS = ("batches_create", "messages")
# The after-commit faults: "after_commit" answers a 500 or 529 (x-should-retry: true); "after_commit_no_retry" a 500
# marked `x-should-retry: false`, as seen in an incident (anthropics/claude-code#35491): the header says nothing
# of whether the work was done (reference anthropic-api.md §0.8).
AFTER_COMMIT_KINDS = ("after_commit", "after_commit_no_retry")
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)


def failure_for(kind: str, retry_after_s: float) -> ApiFailure:
    """The error answer of a 429/529/500/spend_limit fault ("drop" and "error_event" happen mid-response)."""
    if kind == "spend_limit":
        # A 429 that waiting does not cure: the organisation's spend limit; `details.error_code` says which.
        return ApiFailure(
            "rate_limit_error",
            "You have reached your specified API usage limits. You will regain access when the limit resets.",
            details={"error_code": "enforced_spend_limit_reached"},
        )
    if kind == "spend_limit_400":
        # A spend limit the organisation set for itself: a 400 (docs: /api/rate-limits; reference §3).
        return ApiFailure(
            "invalid_request_error",
            "You have reached your specified API usage limits. You will regain access when the limit resets.",
        )
    if kind == "spend_limit_402":
        # The linked organisation's spend limit: a 402 billing_error (docs: /api/errors; issue #15).
        return ApiFailure(
            "billing_error",
            "Your linked organization has reached its spend limit.",
            details={"error_code": "linked_organization_spend_limit_reached"},
        )
    if kind == "500_no_retry":
        # A 500 the API marks not worth retrying (seen in an incident, anthropics/claude-code#35491).
        return ApiFailure("api_error", "Internal server error", headers={"x-should-retry": "false"})
    if kind == "429":
        return ApiFailure(
            "rate_limit_error",
            "Rate limited (injected by the emulator).",
            headers={"retry-after": _seconds(retry_after_s)},
        )
    if kind == "529":
        return ApiFailure("overloaded_error", "Overloaded")
    return ApiFailure("api_error", "Internal server error")


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


class FaultInjector:
    """Scripted faults fire first, in order; otherwise one seeded draw against the configured rates."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._scripted: dict[str, deque[str]] = {}
        self.injected: dict[str, int] = {}

    def script(self, endpoint: str, kind: str, count: int = 1) -> None:
        """Make the next `count` calls to `endpoint` fail with `kind`."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; known: {', '.join(ENDPOINTS)}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if count < 1:
            raise ValueError("count must be at least 1")
        self._scripted.setdefault(endpoint, deque()).extend([kind] * count)

    def draw(self, endpoint: str, settings: EmulatorSettings) -> str | None:
        queue = self._scripted.get(endpoint)
        if queue:
            return self._count(queue.popleft())
        after_commit = settings.fault_after_commit_rate if endpoint in AFTER_COMMIT_ENDPOINTS else 0.0
        if after_commit and self._rng.random() < after_commit:
            return self._count("after_commit")
        if endpoint not in settings.fault_endpoints and "*" not in settings.fault_endpoints:
            return None
        rates = (
            ("429", settings.fault_rate_429),
            ("529", settings.fault_rate_529),
            ("500", settings.fault_rate_500),
            ("drop", settings.fault_rate_drop),
        )
        if not any(rate for _, rate in rates):
            return None
        draw = self._rng.random()
        for kind, rate in rates:
            if draw < rate:
                return self._count(kind)
            draw -= rate
        return None

    def after_commit_failure(self, kind: str = "after_commit") -> ApiFailure:
        """The error answered after an after-commit fault did its work: a 500 or a 529 at random, or for
        "after_commit_no_retry" a 500 with `x-should-retry: false`."""
        if kind == "after_commit_no_retry":
            return failure_for("500_no_retry", 0)
        return failure_for("500" if self._rng.random() < 0.5 else "529", 0)

    def _count(self, kind: str) -> str:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        return kind

    def pending(self) -> dict[str, list[str]]:
        return {endpoint: list(queue) for endpoint, queue in self._scripted.items() if queue}

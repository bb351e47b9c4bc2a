"""The run's spending limit: what is spent, what is reserved by requests in flight, and whether one more fits.

Pure bookkeeping (no IO): the lanes reserve an estimate before sending, settle it with the real cost after.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from batch_engine.config import Config, ModelSpec, Route
from batch_engine.models import ErrorInfo
from batch_engine.planning import PlannedTask
from batch_engine.planning.params import frame_prefix
from batch_engine.planning.pricing import estimate_cost


@dataclass(frozen=True, slots=True)
class Estimator:
    """Cost estimate of one task before it is sent.

    Input: the exact count when `messages.count_tokens` was asked, else the offline estimate. Output: the
    task type's observed high-water mark (p95 from the usage log) when there is history, else all of max_tokens.
    """

    config: Config
    counted_input: Mapping[int, int] = field(default_factory=dict)  # input index → counted tokens
    output_history: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (task type, model) → tokens

    def output_tokens(self, task: PlannedTask) -> int:
        max_tokens = int(task.frame.get("max_tokens", 0))
        seen = self.output_history.get((task.task_type, task.model))
        return min(max_tokens, seen) if seen is not None else max_tokens

    def input_tokens(self, task: PlannedTask) -> int:
        return self.counted_input.get(task.index, task.estimated_input_tokens)

    def cost(self, task: PlannedTask, route: Route) -> float:
        spec = self.config.models[task.model]
        return estimate_cost(
            self.input_tokens(task), self.output_tokens(task), spec, route, self.config, self.cache_write(task)
        )

    def cache_write(self, task: PlannedTask) -> tuple[int, str] | None:
        """(tokens, TTL) the task's cache breakpoint writes, or None when it writes nothing.

        Planning marks a system prompt for caching on the offline estimate (the tokenizer family's factor, so a
        5.x prompt is not under-counted). When the prompt was counted, the prefix is the estimate scaled by how far
        off the whole prompt's estimate was, never more than the count; below the model's minimum cacheable
        length the API caches nothing, so no write premium is expected.
        """
        spec = self.config.models[task.model]
        write = cache_write_of(task, spec)
        counted = self.counted_input.get(task.index)
        if write is None or counted is None or not task.estimated_input_tokens:
            return write
        tokens, ttl = write
        tokens = min(counted, math.ceil(tokens * counted / task.estimated_input_tokens))
        return (tokens, ttl) if tokens >= spec.min_cacheable_tokens else None

    def max_cost(self, task: PlannedTask, route: Route) -> float:
        """The most the task's request can cost: what the budget reserves while it is in flight.

        Output: all of max_tokens (thinking included). Input: the exact count when there is one, else four
        tokens per estimated token (the estimate is a quarter of the text's bytes; no tokenizer makes more than
        a token per byte of text), every token at the dearest input rate (a 1-hour cache write) and the rate
        card of the prompt size that bound reaches.
        """
        counted = self.counted_input.get(task.index)
        input_tokens = counted if counted is not None else 4 * task.estimated_input_tokens
        spec = self.config.models[task.model]
        price = spec.price_for_prompt(input_tokens)
        dollars = (
            input_tokens * max(price.input, price.cache_write_5m, price.cache_write_1h)
            + int(task.frame.get("max_tokens", 0)) * price.output
        ) / 1_000_000
        return dollars * (self.config.batch_discount if route == "batch" else 1.0)


def cache_write_of(task: PlannedTask, spec: ModelSpec) -> tuple[int, str] | None:
    """(estimated tokens, TTL) of the task's system prompt when it carries a cache breakpoint, else None."""
    if task.cache_key is None:
        return None
    _, tokens, ttl = frame_prefix(task.frame)
    return (math.ceil(tokens * spec.tokenizer_factor), ttl or "5m") if ttl is not None else None


@dataclass
class Budget:
    """A hard limit in USD. Once one reservation is refused the budget stays stopped: no later task is sent."""

    limit_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    stopped: bool = False

    @classmethod
    def unlimited(cls) -> Budget:
        """The budget of a run without `max_cost_usd`: every reservation fits."""
        return cls(math.inf)

    @property
    def limited(self) -> bool:
        """False for the unlimited budget: lanes then skip the per-request estimates altogether."""
        return not math.isinf(self.limit_usd)

    def reserve(self, estimate_usd: float) -> bool:
        if self.stopped or self.spent_usd + self.reserved_usd + estimate_usd > self.limit_usd:
            self.stopped = True
            return False
        self.reserved_usd += estimate_usd
        return True

    def try_reserve(self, estimate_usd: float, settling_usd: float) -> Literal["reserved", "wait", "refused"]:
        """Reserve if it fits; "wait" if it would fit once `settling_usd` of the reservations (requests in flight,
        settled soon) are settled at no more than they reserved; else refuse and stop."""
        if self.stopped:
            return "refused"
        if self.spent_usd + self.reserved_usd + estimate_usd <= self.limit_usd:
            self.reserved_usd += estimate_usd
            return "reserved"
        if settling_usd > 0 and self.spent_usd + self.reserved_usd - settling_usd + estimate_usd <= self.limit_usd:
            return "wait"
        self.stopped = True
        return "refused"

    def settle(self, estimate_usd: float, actual_usd: float) -> None:
        self.reserved_usd = max(0.0, self.reserved_usd - estimate_usd)
        self.spent_usd += actual_usd

    def refusal(self) -> ErrorInfo:
        """The error of a task that was not sent because of the budget."""
        return ErrorInfo(
            type="budget_exceeded",
            message=f"not sent: the run's budget of ${self.limit_usd:.4f} would be exceeded "
            f"(spent ${self.spent_usd:.4f}, in flight ${self.reserved_usd:.4f})",
        )

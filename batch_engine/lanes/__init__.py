"""The two lanes that do IO — batch (submit, poll, collect, resubmit) and realtime (workers under rate
limits) — and what they share for one run: the client, the ledger, attempts so far, and live progress."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from batch_engine.client import Connection, RetryPolicy
from batch_engine.config import Config
from batch_engine.crashpoints import crash_point
from batch_engine.lanes.limiter import RateLimiter
from batch_engine.lanes.sender import Sender
from batch_engine.models import BILLED_STATUSES
from batch_engine.planning import PlannedTask
from batch_engine.planning.budget import Budget, Estimator
from batch_engine.planning.outcome import FinishedRow, folded
from batch_engine.state.backend import RunLedger, UsageStore
from batch_engine.state.usage_log import usage_record

BILLED = BILLED_STATUSES  # statuses of rows whose request was billed


async def all_or_none(*calls: Awaitable[None]) -> None:
    """Run `calls` concurrently; if one fails, cancel the others (the ledger keeps what they finished)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass
class Progress:
    """Live counters for a progress display; lanes only add to them."""

    batches_submitted: int = 0
    batches_ended: int = 0
    batch_rows_done: int = 0
    batch_rows_failed: int = 0
    realtime_in_flight: int = 0
    realtime_done: int = 0
    realtime_failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, result: FinishedRow) -> None:
        ok = result.status == "succeeded"
        if result.route == "batch":
            self.batch_rows_done += ok
            self.batch_rows_failed += not ok
        else:
            self.realtime_done += ok
            self.realtime_failed += not ok
        if result.usage is not None:
            self.input_tokens += result.usage.prompt_tokens
            self.output_tokens += result.usage.output_tokens
        self.cost_usd += result.cost_usd

    def realtime_answered(self, seconds: float) -> None:
        """A realtime task answered `seconds` after its first request, retries and their waits included (the
        usage log keeps only its billed request's time); a display or a benchmark may keep it."""


@dataclass(frozen=True, slots=True)
class SharedLimit:
    """Request-rate limits shared with other processes (e.g. Prefect global concurrency limits), chosen by model.

    Anthropic's rate limits are per model class, so each model's requests take slots from the limit `names` gives
    it; `"*"` covers every model without an entry of its own, and a model with neither takes no shared slot.
    `take(name, n)` waits until `n` slots of limit `name` are free and takes them. Each take is a round trip to
    whatever keeps the limit (~0.2 s against a Prefect server), so the realtime lane takes up to `blocks[name]`
    slots at a time, not one per request.
    """

    ANY_MODEL: ClassVar[str] = "*"

    take: Callable[[str, int], Awaitable[None]]
    names: Mapping[str, str]  # model, or "*" for every other model → limit name
    blocks: Mapping[str, int]  # limit name → slots per take

    def __post_init__(self) -> None:
        missing = sorted(set(self.names.values()) - set(self.blocks))
        if missing:
            raise ValueError(f"no block size for shared limits {missing}")

    @classmethod
    def single(cls, name: str, take: Callable[[str, int], Awaitable[None]], block: int) -> SharedLimit:
        """One limit for every model."""
        return cls(take=take, names={cls.ANY_MODEL: name}, blocks={name: block})

    def limit_for(self, model: str) -> str | None:
        """The limit `model`'s requests take slots from; None when they take none."""
        return self.names.get(model, self.names.get(self.ANY_MODEL))


@dataclass
class LaneContext:
    """Everything a lane needs for one run."""

    api: Connection
    sender: Sender  # where the realtime lane's requests go: inline on `api`, or a sender process
    config: Config
    ledger: RunLedger
    run_key: str
    tasks: dict[int, PlannedTask]  # by input index
    attempts: dict[int, int]  # input index → requests sent for it so far (batch rows and realtime calls)
    policy: RetryPolicy
    logger: logging.Logger | logging.LoggerAdapter[Any]
    # Raises LeaseLostError once another process has taken the run over: called before every batch create and
    # realtime request, so a process that lost its lease pays for nothing more.
    lease_check: Callable[[], None]
    usage_log: UsageStore
    estimator: Estimator
    budget: Budget  # Budget.unlimited() without max_cost_usd
    progress: Progress = field(default_factory=Progress)
    limiters: dict[str, RateLimiter] = field(default_factory=dict)
    cached_prefix_tokens: dict[str, int] = field(default_factory=dict)  # cache_key → tokens seen cached
    latencies: dict[int, float] = field(default_factory=dict)  # input index → seconds of its billed request
    request_ids: dict[int, str] = field(default_factory=dict)  # input index → request-id of its billed reply
    shared_limit: SharedLimit | None = None  # on top of the local buckets, across every worker and flow run

    def record(self, results: list[FinishedRow], at: float | None = None) -> None:
        """Log the billed rows, make every row durable, then count them (as finished `at`, default now).

        The usage log goes first: if the process dies between the two writes, a realtime task is sent again on
        resume and really is billed twice, which the log then shows; a batch row read again is logged once (its
        key is the batch id and custom_id).
        """
        now = time.time() if at is None else at
        self.usage_log.append(
            [
                usage_record(
                    self.tasks[r.index],
                    r,
                    self.run_key,
                    now,
                    self.latencies.pop(r.index, None),
                    self.config,
                    self.request_ids.pop(r.index, None),
                )
                for r in results
                if r.status in BILLED
            ]
        )
        crash_point("usage.logged")
        if self.has_output_schemas:
            results = self._fold_retries(results)
        self.ledger.save_results(self.run_key, results, now)
        for result in results:
            self.progress.add(result)

    def log_billed_only(self, results: list[FinishedRow], at: float) -> None:
        """Log the usage of billed rows whose results this run does not keep: rows of a superseded run's batch
        whose task's request changed (it is sent again). Keyed by batch id and custom_id, so logged once."""
        self.usage_log.append(
            usage_record(self.tasks[r.index], r, self.run_key, at, None, self.config)
            for r in results
            if r.status in BILLED
        )

    @functools.cached_property
    def by_task_id(self) -> dict[str, PlannedTask]:
        return {task.task_id: task for task in self.tasks.values()}

    @functools.cached_property
    def has_output_schemas(self) -> bool:
        return any(task.output is not None for task in self.tasks.values())

    def _fold_retries(self, results: list[FinishedRow]) -> list[FinishedRow]:
        # A row that replaces an invalid_output row is its retry: both requests were billed, so the row carries both.
        earlier = {row.index: row for row in self.ledger.invalid_outputs(self.run_key, (r.index for r in results))}
        if not earlier:
            return results
        return [folded(earlier[r.index], r) if r.index in earlier else r for r in results]

    def limiter(self, model: str) -> RateLimiter:
        limiter = self.limiters.get(model)
        if limiter is None:
            limits = self.config.limits
            limiter = self.limiters[model] = RateLimiter(limits.rpm, limits.itpm, limits.otpm)
        return limiter

"""Exact input token counts for a plan through `messages.count_tokens`: identical prompts counted once,
concurrently, under the endpoint's own RPM limit; anything that cannot be counted keeps the offline estimate."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from batch_engine.client import RetryPolicy, count_tokens
from batch_engine.errors import ApiError
from batch_engine.lanes import all_or_none
from batch_engine.lanes.limiter import RateLimiter
from batch_engine.planning import PlannedTask
from batch_engine.planning.tokens import TokenCounts

if TYPE_CHECKING:
    from batch_engine.client import AsyncClient

_UNLIMITED = 10**12
COUNT_CONCURRENCY = 16


def _prompt_key(task: PlannedTask) -> bytes:
    # max_tokens does not change the input count, so prompts differing only there are counted once.
    return orjson.dumps({k: v for k, v in task.params.items() if k != "max_tokens"}, option=orjson.OPT_SORT_KEYS)


async def count_plan_tokens(
    client: AsyncClient, tasks: Sequence[PlannedTask], rpm: int, policy: RetryPolicy | None = None
) -> TokenCounts:
    """Count every distinct prompt once; on failure keep the offline estimate and say so in `note`."""
    groups: dict[bytes, list[PlannedTask]] = {}
    for task in tasks:
        groups.setdefault(_prompt_key(task), []).append(task)
    limiter = RateLimiter(rpm, _UNLIMITED, _UNLIMITED)
    policy = policy or RetryPolicy(attempts=4, max_time_s=60)
    pending = iter(groups.values())
    by_index: dict[int, int] = {}
    failures: list[str] = []

    async def count_one(task: PlannedTask) -> int:
        await limiter.acquire(1)
        return await count_tokens(client, task.params)

    async def worker() -> None:
        for group in pending:
            try:
                counted = await policy.call(functools.partial(count_one, group[0]))
            except ApiError as exc:
                failures.append(exc.message)
                continue
            for task in group:
                by_index[task.index] = counted

    await all_or_none(*(worker() for _ in range(min(COUNT_CONCURRENCY, len(groups)) or 1)))
    note = None
    if failures:
        note = (
            f"token counting failed for {len(failures)} of {len(groups)} distinct prompts "
            f"({failures[0]}); the offline estimate is used for them"
        )
    return TokenCounts(by_index, len(groups), note)

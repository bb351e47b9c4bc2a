"""The Prefect side of the shared rate limit: a global concurrency limit that cannot enforce a rate is refused
up front, and a usable one hands the realtime lane blocks of slots."""

from __future__ import annotations

import asyncio

import pytest
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from batch_engine.errors import ConfigError
from flows.limits import create_command, shared_rate_limit


async def _create(name: str, limit: int, decay: float) -> None:
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay)
        )


async def _active_slots(name: str) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).active_slots


def test_a_missing_limit_is_refused_with_the_command_that_creates_it(prefect_harness: None) -> None:
    with pytest.raises(ConfigError, match="prefect gcl create no-such-rpm --limit"):
        asyncio.run(shared_rate_limit("no-such-rpm", 32))


def test_a_limit_without_slot_decay_is_refused(prefect_harness: None) -> None:
    asyncio.run(_create("concurrency-only", 100, 0.0))
    with pytest.raises(ConfigError, match="no slot decay"):
        asyncio.run(shared_rate_limit("concurrency-only", 32))


def test_a_rate_limit_hands_out_blocks_of_at_most_a_tenth_of_the_limit(prefect_harness: None) -> None:
    asyncio.run(_create("test-rpm", 120, 0.01))

    async def take() -> tuple[int, int]:
        shared = await shared_rate_limit("test-rpm", 32)
        await shared.take(shared.block)
        return shared.block, await _active_slots("test-rpm")

    block, active = asyncio.run(take())
    assert block == 12
    # The slots stay taken until they decay: that is what limits the rate across processes.
    assert active >= 11


def test_the_documented_create_command_uses_rpm_over_60_as_decay() -> None:
    assert (
        create_command("anthropic-rpm", 4000)
        == "prefect gcl create anthropic-rpm --limit 4000 --slot-decay-per-second 66.67"
    )

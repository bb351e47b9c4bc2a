"""The Prefect side of the shared rate limits: a global concurrency limit that cannot enforce a rate is refused
up front, a usable one hands the realtime lane blocks of slots, each model takes slots from its own limit, and
the `batch-collect` flow's realtime leftovers take them too."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from pydantic import SecretStr

from batch_engine.client import ApiSettings
from batch_engine.config import Config, load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.errors import ConfigError
from batch_engine.lanes import SharedLimit
from batch_engine.models import RunSummary
from batch_engine.orchestration.limits import check_models, create_command, limit_names, shared_rate_limit
from batch_engine.orchestration.orchestrator import _describe_shared_limit, batch_orchestrator, collect
from batch_engine.runner import Run, RunOptions
from batch_engine.state.ledger import Ledger
from tests.support.engine import fast_config, generated_tasks, messages_calls, write_jsonl


async def _create(name: str, limit: int, decay: float, *, active: bool = True) -> None:
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay, active=active)
        )


async def _never(name: str, slots: int) -> None:
    raise AssertionError(f"took {slots} slots of {name}")


async def _active_slots(name: str) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).active_slots


def test_a_missing_limit_is_refused_with_the_command_that_creates_it(prefect_harness: None) -> None:
    with pytest.raises(ConfigError, match="prefect gcl create no-such-rpm --limit"):
        asyncio.run(shared_rate_limit("no-such-rpm"))


def test_a_limit_without_slot_decay_is_refused(prefect_harness: None) -> None:
    asyncio.run(_create("concurrency-only", 100, 0.0))
    with pytest.raises(ConfigError, match="no slot decay"):
        asyncio.run(shared_rate_limit("concurrency-only"))


def test_a_rate_limit_hands_out_blocks_of_at_most_a_tenth_of_the_limit(prefect_harness: None) -> None:
    asyncio.run(_create("test-rpm", 120, 0.01))

    async def take() -> tuple[int, int]:
        shared = await shared_rate_limit("test-rpm")
        assert shared.limit_for("any-model") == "test-rpm"
        await shared.take("test-rpm", shared.blocks["test-rpm"])
        return shared.blocks["test-rpm"], await _active_slots("test-rpm")

    block, active = asyncio.run(take())
    assert block == 12
    # The slots stay taken until they decay: that is what limits the rate across processes.
    assert active >= 11


def test_the_documented_create_command_uses_rpm_over_60_as_decay() -> None:
    assert (
        create_command("anthropic-rpm", 4000)
        == "prefect gcl create anthropic-rpm --limit 4000 --slot-decay-per-second 66.67"
    )


# --- one limit per model class ---------------------------------------------------------------------------------


def test_one_name_limits_every_model_and_a_mapping_only_the_models_it_names() -> None:
    assert limit_names("anthropic-rpm") == {"*": "anthropic-rpm"}
    with pytest.raises(ConfigError, match="empty mapping"):
        limit_names({})
    with pytest.raises(ConfigError, match="no limit name for 'claude-haiku-4-5'"):
        limit_names({"claude-haiku-4-5": " "})
    shared = SharedLimit(take=_never, names={"claude-haiku-4-5": "haiku-rpm"}, blocks={"haiku-rpm": 5})
    assert shared.limit_for("claude-haiku-4-5") == "haiku-rpm"
    assert shared.limit_for("claude-opus-5") is None
    with_default = SharedLimit(take=_never, names={"claude-haiku-4-5": "h", "*": "any"}, blocks={"h": 1, "any": 1})
    assert with_default.limit_for("claude-opus-5") == "any"


def test_a_mapping_naming_a_model_the_config_lacks_is_refused() -> None:
    shared = SharedLimit(take=_never, names={"claude-haiku-4-6": "haiku-rpm"}, blocks={"haiku-rpm": 5})
    with pytest.raises(ConfigError, match="'claude-haiku-4-6'"):
        check_models(shared, load_config().models)
    check_models(SharedLimit.single("anthropic-rpm", _never, 5), load_config().models)


def test_every_limit_of_a_mapping_is_checked_up_front(prefect_harness: None) -> None:
    asyncio.run(_create("haiku-ok-rpm", 600, 10.0))
    asyncio.run(_create("sonnet-off-rpm", 600, 10.0, active=False))
    with pytest.raises(ConfigError, match="'no-such-default-rpm' does not exist"):
        asyncio.run(shared_rate_limit({"claude-haiku-4-5": "haiku-ok-rpm", "*": "no-such-default-rpm"}))
    with pytest.raises(ConfigError, match="'sonnet-off-rpm' is inactive"):
        asyncio.run(shared_rate_limit({"claude-haiku-4-5": "haiku-ok-rpm", "claude-sonnet-4-6": "sonnet-off-rpm"}))


def test_a_mapping_keeps_a_block_per_limit_and_takes_only_from_the_named_one(prefect_harness: None) -> None:
    asyncio.run(_create("haiku-rpm", 600, 0.01))
    asyncio.run(_create("sonnet-rpm", 50, 0.01))

    async def take() -> tuple[SharedLimit, int, int]:
        shared = await shared_rate_limit({"claude-haiku-4-5": "haiku-rpm", "claude-sonnet-4-6": "sonnet-rpm"})
        await shared.take("sonnet-rpm", shared.blocks["sonnet-rpm"])
        return shared, await _active_slots("haiku-rpm"), await _active_slots("sonnet-rpm")

    shared, haiku_active, sonnet_active = asyncio.run(take())
    assert shared.blocks == {"haiku-rpm": 60, "sonnet-rpm": 5}
    assert haiku_active == 0 and sonnet_active >= 4


class CountingLimit:
    def __init__(self) -> None:
        self.takes: dict[str, list[int]] = {}

    async def take(self, name: str, slots: int) -> None:
        await asyncio.sleep(0.01)  # a round trip: workers arriving meanwhile must wait for this block
        self.takes.setdefault(name, []).append(slots)


def _run_with_shared_limit(
    emulator: RunningEmulator, source: Path, tmp_path: Path, shared: SharedLimit, config: Config
) -> RunSummary:
    """A run's lanes against the emulator with `shared` on top of the local buckets; the output written."""
    run = Run.prepare(source, tmp_path / "out.json", config, RunOptions(state_dir=tmp_path / "state"))

    async def go() -> None:
        async with run.lanes(ApiSettings(SecretStr("sk-test"), emulator.base_url), shared_limit=shared) as lanes:
            await run.send(lanes)

    try:
        asyncio.run(go())
        return run.finish()
    finally:
        run.close()


def test_the_realtime_lane_takes_shared_slots_in_blocks_covering_every_request(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(50, realtime_every=1))
    counting = CountingLimit()

    summary = _run_with_shared_limit(
        emulator, source, tmp_path, SharedLimit.single("rpm", counting.take, 8), fast_config()
    )

    assert summary.counts.succeeded == 50
    # 50 requests in blocks of 8: 7 blocks, not 50 round trips, and never fewer slots than requests.
    assert counting.takes == {"rpm": [8] * 7}


def test_the_realtime_lane_takes_each_models_slots_from_its_own_limit(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    per_model = {"claude-haiku-4-5": 12, "claude-sonnet-4-6": 9, "claude-opus-5": 5}
    models = [model for i in range(12) for model, count in per_model.items() if i < count]  # interleaved
    tasks = [
        {"task_id": f"m{i}", "task_type": "user_query", "model": model, "input_data": {"question": f"q {i}?"}}
        for i, model in enumerate(models)
    ]
    source = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    counting = CountingLimit()
    # Haiku's block (50) is more than the lane's 4 workers can use soon: it takes 4 at a time.
    shared = SharedLimit(
        take=counting.take,
        names={"claude-haiku-4-5": "haiku-rpm", "claude-sonnet-4-6": "sonnet-rpm"},
        blocks={"haiku-rpm": 50, "sonnet-rpm": 3},
    )
    summary = _run_with_shared_limit(emulator, source, tmp_path, shared, fast_config(realtime_concurrency=4))

    assert summary.counts.succeeded == len(tasks)
    # 12 haiku requests in blocks of 4, 9 sonnet requests in blocks of 3; opus is under no shared limit.
    assert counting.takes == {"haiku-rpm": [4, 4, 4], "sonnet-rpm": [3, 3, 3]}


def test_a_model_under_no_limit_is_said_once_at_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tasks = [
        {"task_id": f"u{i}", "task_type": "user_query", "model": model, "input_data": {"question": f"q {i}?"}}
        for i, model in enumerate(["claude-haiku-4-5", "claude-opus-5", "claude-opus-5"])
    ]
    source = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    run = Run.prepare(source, tmp_path / "out.json", fast_config(), RunOptions(state_dir=tmp_path / "state"))
    shared = SharedLimit(take=_never, names={"claude-haiku-4-5": "haiku-rpm"}, blocks={"haiku-rpm": 100})
    logger = logging.getLogger("test-shared-limit")
    described: set[str] = set()
    try:
        with caplog.at_level(logging.INFO, logger.name):
            _describe_shared_limit(shared, run, logger, described=described)
            _describe_shared_limit(shared, run, logger, described=described)  # a second run in the same collect
    finally:
        run.close()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "realtime: claude-haiku-4-5 also under global rate limit 'haiku-rpm', 32 slots at a time"),
        (
            logging.INFO,
            'realtime: claude-opus-5 is under no global rate limit (global_rate_limit has no entry for it and no "*")',
        ),
    ]


def test_the_collect_flow_sends_realtime_leftovers_under_the_global_rate_limit(
    prefect_harness: None, emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-collect-limit-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    emulator.configure(batch_never_ends=True)
    asyncio.run(_create("collect-rpm", 100, 0.01))
    tasks = generated_tasks(12, realtime_every=None)
    state_dir = tmp_path / "state"
    # wait=false leaves the batch to `collect`; past the 1 s batch timeout collect cancels it and sends its rows
    # realtime.
    submitted = asyncio.run(
        batch_orchestrator(
            input_path=str(write_jsonl(tmp_path / "tasks.jsonl", tasks)),
            output_path=str(tmp_path / "out.json"),
            state_dir=str(state_dir),
            batch_timeout_s=1.0,
            poll_interval_s=0.2,
            wait=False,
        )
    )
    assert submitted is None
    with Ledger.open(state_dir) as ledger:
        (record,) = ledger.runs("submitted")
    time.sleep(max(0.0, record.started_at + 1.05 - time.time()))

    # A mapping naming the model classify_bulk runs on (the "cheap" tier).
    limit = {"claude-haiku-5-5": "collect-rpm"}
    (summary,) = asyncio.run(collect(state_dir=str(state_dir), global_rate_limit=limit))

    assert summary.all_succeeded and summary.counts.by_route == {"realtime": 12}
    assert messages_calls(emulator.stats()) == {"200": 12}
    # Every leftover took a slot: the slots stay taken until they decay (0.01/s).
    assert asyncio.run(_active_slots("collect-rpm")) >= 12

"""Collecting a chunk twice (a Prefect retry of `wait-and-collect`, two collectors, a re-run) changes nothing:
no succeeded row is replaced, no row's attempts go backwards, and the usage log holds one row per billed request,
equal to what the emulator billed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings
from batch_engine.emulator import RunningEmulator
from batch_engine.runner import Run, RunOptions
from batch_engine.state.ledger import Ledger
from batch_engine.state.usage_log import UsageLog
from tests.support.engine import NO_WAIT_POLICY, fast_config, generated_tasks, run_engine, write_jsonl


def _usage_cost(state: Path) -> tuple[int, float]:
    with UsageLog.open(state) as log:
        records = log.records()
    return len(records), sum(record.cost_usd for record in records)


def _replay_every_collect(emulator: RunningEmulator, tmp_path: Path, input_path: Path) -> None:
    """What a Prefect retry of each `wait-and-collect` does: collect every recorded batch of the run again."""
    options = RunOptions(state_dir=tmp_path / "state", mode="batch")
    run = Run.prepare(input_path, tmp_path / "out.json", fast_config(), options)
    api = ApiSettings(SecretStr("sk-test"), emulator.base_url)

    async def replay() -> None:
        async with run.lanes(api, policy=NO_WAIT_POLICY) as lanes:
            for chunk in run.ledger.chunks(run.key):
                if chunk.batch_id is not None:
                    await lanes.batch.wait_and_collect(chunk)

    try:
        asyncio.run(replay())
    finally:
        run.close()


def test_collecting_every_batch_again_replaces_no_success_and_logs_no_usage_twice(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # Errored rows are resubmitted and succeed in a second batch: a replay of the first batch's collect then
    # holds older errors for rows that have since succeeded.
    emulator.configure(batch_row_error_rate=0.3, seed=7)
    input_path = write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(50, realtime_every=None))
    first = run_engine(emulator, input_path, tmp_path, options=RunOptions(state_dir=tmp_path / "state", mode="batch"))
    succeeded = first.summary.counts.succeeded
    assert succeeded > 40
    with Ledger.open(tmp_path / "state") as ledger:
        (record,) = ledger.runs()
        assert len([c for c in ledger.chunks(record.run_key) if c.batch_id]) >= 2  # some rows were resubmitted
        before = {r.index: (r.status, r.attempts) for r in ledger.results(record.run_key)}
    billed = emulator.stats()["cost_usd"]["total"]
    assert _usage_cost(tmp_path / "state") == (succeeded, pytest.approx(billed))

    _replay_every_collect(emulator, tmp_path, input_path)

    with Ledger.open(tmp_path / "state") as ledger:
        after = {r.index: (r.status, r.attempts) for r in ledger.results(record.run_key)}
    assert after == before
    assert emulator.stats()["cost_usd"]["total"] == billed  # the replay sent nothing
    assert _usage_cost(tmp_path / "state") == (succeeded, pytest.approx(billed))

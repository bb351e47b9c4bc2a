"""The `batch-orchestrator` and `batch-collect` flows on the real Prefect engine (one harness per session),
against the emulator over HTTP: outputs, task runs, artifacts, retries, wait=false + collect, logs."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import orjson
import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import Log
from prefect.logging.handlers import APILogHandler
from prefect.states import State
from pydantic import SecretStr

from batch_engine.client import ApiSettings
from batch_engine.emulator import RunningEmulator
from batch_engine.errors import BatchEngineError
from batch_engine.orchestration.deployments import NIGHTLY_CRON, build_deployments
from batch_engine.orchestration.orchestrator import batch_orchestrator, collect, plan_run, submit_chunk, unwalked
from batch_engine.render.artifacts import SUMMARY_KEY, TABLE_KEY
from batch_engine.runner import RunOptions
from batch_engine.state.lease import holder_alive
from batch_engine.state.ledger import Lease, Ledger

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TASKS = ROOT / "samples" / "nightly_tasks.json"
SAMPLE_CONFIG = ROOT / "samples" / "config.toml"
API_KEY = "sk-ant-canary-4f1c9e"  # must never show up in a log line or a parameter

pytestmark = pytest.mark.usefixtures("prefect_harness")
T = TypeVar("T")


@pytest.fixture
def api_env(emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningEmulator]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    yield emulator


def _without_timings(output: bytes) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads(output)
    for key in ("durations_s", "finished_at"):
        document["run"].pop(key)
    return document


def _params(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "input_path": str(SAMPLE_TASKS),
        "output_path": str(tmp_path / "out.json"),
        "config_path": str(SAMPLE_CONFIG),
        "state_dir": str(tmp_path / "state"),
        "poll_interval_s": 0.2,
        **overrides,
    }


def _run_flow(flow_call: Awaitable[State[Any]]) -> tuple[UUID, Any]:
    async def go() -> State[Any]:
        return await flow_call

    state = asyncio.run(go())
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    return flow_run_id, state.result()


def _eventually(read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout_s: float = 15) -> T:
    """The server records task runs and logs from events, a little after the flow returns."""

    async def poll() -> T:
        deadline = time.monotonic() + timeout_s
        while True:
            value = await read()
            if done(value) or time.monotonic() > deadline:
                return value
            await asyncio.sleep(0.2)

    return asyncio.run(poll())


def _task_run_names(flow_run_id: UUID, expected: int) -> list[str]:
    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return sorted(run.name for run in runs)

    return _eventually(read, lambda names: len(names) >= expected)


def _task_run_names_by_id(flow_run_id: UUID) -> dict[UUID | None, str]:
    async def read() -> dict[UUID | None, str]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.id: run.name for run in runs}

    return _eventually(read, lambda names: len(names) >= 7)


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with get_client() as client:
            found = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {artifact.key: artifact for artifact in found if artifact.key}

    return _eventually(read, lambda keys: {SUMMARY_KEY, TABLE_KEY} <= keys.keys())


def _output(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    document = orjson.loads(path.read_bytes())
    return document["run"], document["results"]


def test_the_flow_runs_the_samples_in_eight_task_runs_and_publishes_its_artifacts(
    api_env: RunningEmulator, tmp_path: Path
) -> None:
    flow_run_id, summary = _run_flow(batch_orchestrator(**_params(tmp_path), return_state=True))

    run, rows = _output(tmp_path / "out.json")
    inputs = orjson.loads(SAMPLE_TASKS.read_bytes())
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in inputs]
    assert all(row["status"] == "succeeded" for row in rows)
    assert run["counts"]["by_route"] == {"batch": 241, "realtime": 63}
    assert summary.run_key == run["run_key"] and summary.all_succeeded
    # One task per phase and per batch, never per request: 304 requests, 8 task runs.
    names = _task_run_names(flow_run_id, expected=8)
    assert len(names) == 8, names
    assert {"submit-c0", "collect-c0"} <= set(names)
    assert {name.rsplit("-", 1)[0] for name in names} == {
        "plan",
        "begin",
        "submit",
        "collect",
        "realtime-lane",
        "park",
        "merge-and-write",
        "publish-artifacts",
    }

    artifacts = _artifacts(flow_run_id)
    markdown = artifacts[SUMMARY_KEY].data
    assert f"`{run['run_key']}`" in markdown
    assert "304: 304 succeeded, 0 failed, 0 rejected" in markdown
    assert f"${run['cost']['baseline_usd']:.4f}" in markdown and f"({run['cost']['savings_pct']:.1f}%)" in markdown
    assert f"{run['cache_hit_rate']:.1%}" in markdown
    assert run["batches"][0]["id"] in markdown
    assert artifacts[SUMMARY_KEY].description.startswith("304 tasks · 0 failed · 0 rejected · $")
    table = orjson.loads(artifacts[TABLE_KEY].data)
    assert sum(int(row["tasks"]) for row in table) == 304
    assert {row["route"] for row in table} == {"batch", "realtime"}
    assert "Total: 304 tasks · 304 succeeded · 0 failed · 0 rejected" in artifacts[TABLE_KEY].description
    state = _flow_run_state(flow_run_id)
    assert state.is_completed()
    assert state.message is not None and state.message.startswith("304 succeeded, 0 failed, 0 rejected of 304 tasks")


def _flow_run_state(flow_run_id: UUID) -> State[Any]:
    async def read() -> State[Any]:
        async with get_client() as client:
            state = (await client.read_flow_run(flow_run_id)).state
        assert state is not None
        return state

    return asyncio.run(read())


def _with_bad_records(tmp_path: Path, good: int) -> Path:
    """The first `good` sample tasks, then two records that are rejected (unknown task type, not an object)."""
    tasks = orjson.loads(SAMPLE_TASKS.read_bytes())[:good]
    path = tmp_path / "tasks.json"
    path.write_bytes(orjson.dumps([*tasks, {"task_id": "bad-type", "task_type": "nope", "input_data": {}}, 7]))
    return path


@pytest.mark.parametrize("fail_on_task_failures", [False, True])
def test_a_run_with_rejected_records_says_so_in_its_final_state(
    api_env: RunningEmulator, tmp_path: Path, fail_on_task_failures: bool
) -> None:
    params = _params(tmp_path, input_path=str(_with_bad_records(tmp_path, good=3)), mode="realtime")
    state = asyncio.run(
        _await(batch_orchestrator(**params, fail_on_task_failures=fail_on_task_failures, return_state=True))
    )

    assert state.message is not None
    assert state.message.startswith("3 succeeded, 0 failed, 2 rejected of 5 tasks; cost $")
    # Completed by default (every task is in the output, with its error); Failed when the deployment asks for it.
    assert state.is_failed() if fail_on_task_failures else state.is_completed()
    _, rows = _output(tmp_path / "out.json")
    assert [row["status"] for row in rows] == ["succeeded"] * 3 + ["rejected"] * 2


async def _await(call: Awaitable[T]) -> T:
    return await call


def test_a_retried_submit_task_does_not_create_a_second_batch(api_env: RunningEmulator, tmp_path: Path) -> None:
    crash = _CrashOnceAfterBatchCreated()

    @flow
    async def submit_with_a_crash() -> tuple[State[Any], str | None]:
        options = RunOptions(state_dir=tmp_path / "state", config_path=SAMPLE_CONFIG, mode="batch")
        run = await plan_run(str(SAMPLE_TASKS), str(tmp_path / "out.json"), options)
        try:
            async with run.lanes(ApiSettings(SecretStr(API_KEY), api_env.base_url), logger=crash) as lanes:
                (work,) = run.chunk_works()
                retrying = submit_chunk.with_options(retries=1, retry_delay_seconds=0)
                state = await retrying(unwalked(run), unwalked(lanes), work, return_state=True)
            (chunk,) = run.ledger.chunks(run.key)
            return state, chunk.batch_id
        finally:
            run.close()

    state, recorded_batch = asyncio.run(submit_with_a_crash())

    # The first attempt died after the batch was created and recorded; Prefect ran the task again...
    assert crash.crashed
    assert state.is_completed()
    record = state.result()
    task_run_id = state.state_details.task_run_id
    assert task_run_id is not None

    async def run_count() -> int:
        async with get_client() as client:
            return (await client.read_task_run(task_run_id)).run_count

    assert _eventually(run_count, lambda count: count == 2) == 2
    # ...and the retry re-attached to that batch through the ledger instead of creating another one.
    assert api_env.stats()["batches_created"] == 1
    assert record.batch_id == recorded_batch


class _CrashOnceAfterBatchCreated(logging.LoggerAdapter[logging.Logger]):
    """Raises once, on the lane's "batch ... created" line, which comes right after the batch id is recorded:
    the task fails between the API call and its return, as if the process had been killed there."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("tests.crash"), {})
        self.crashed = False

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self.crashed and str(msg).startswith("batch %s %s for chunk") and args[1] == "created":
            self.crashed = True
            raise RuntimeError("killed right after the batch was created")
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


def test_wait_false_then_collect_writes_the_same_output_as_a_flow_that_waits(
    api_env: RunningEmulator, tmp_path: Path
) -> None:
    submitted = tmp_path / "submitted"
    params = _params(tmp_path, state_dir=str(submitted))
    output = Path(params["output_path"])

    _, result = _run_flow(batch_orchestrator(**params, wait=False, return_state=True))

    assert result is None and not output.exists()
    with Ledger.open(submitted) as ledger:
        (waiting,) = ledger.runs("submitted")
    # Two futures of the same submitted run: one finished by `collect`, the other by a flow that waits.
    shutil.copytree(submitted, tmp_path / "twin")
    collected = _collect_until_finished(str(submitted))
    assert [summary.run_key for summary in collected] == [waiting.run_key]
    by_collect = output.read_bytes()
    output.unlink()

    _, summary = _run_flow(batch_orchestrator(**dict(params, state_dir=str(tmp_path / "twin")), return_state=True))

    # The same rows and run section; only the timings are each invocation's own.
    assert _without_timings(output.read_bytes()) == _without_timings(by_collect)
    assert summary.all_succeeded and summary.counts.total == 304
    # The waiting flow re-attached to the batch submitted by the first flow run; nothing was sent twice.
    stats = api_env.stats()
    assert stats["batches_created"] == 1
    assert stats["duplicate_succeeded_custom_ids"] == 0


def _collect_until_finished(state_dir: str, attempts: int = 30) -> list[Any]:
    for _ in range(attempts):
        _, finished = _run_flow(collect(state_dir=state_dir, return_state=True))
        if finished:
            return list(finished)
        time.sleep(0.3)
    pytest.fail("collect never found the batches ended")


def test_collect_leaves_a_run_whose_batches_are_still_running(api_env: RunningEmulator, tmp_path: Path) -> None:
    api_env.configure(batch_never_ends=True)
    params = _params(tmp_path)
    _run_flow(batch_orchestrator(**params, wait=False, return_state=True))

    _, finished = _run_flow(collect(state_dir=params["state_dir"], return_state=True))

    assert finished == []
    assert not Path(params["output_path"]).exists()
    with Ledger.open(Path(params["state_dir"])) as ledger:
        assert [run.status for run in ledger.runs()] == ["submitted"]


def test_collect_skips_a_run_whose_lease_a_live_process_holds_and_says_so(
    api_env: RunningEmulator, tmp_path: Path
) -> None:
    params = _params(tmp_path)
    output = Path(params["output_path"])
    _run_flow(batch_orchestrator(**params, wait=False, return_state=True))
    state_dir = Path(params["state_dir"])
    with Ledger.open(state_dir) as ledger:
        (waiting,) = ledger.runs("submitted")
        # Another live process works on the run (this test's own pid: alive, on this host, heartbeat fresh).
        now = time.time()
        held = Lease(waiting.run_key, "another-worker", socket.gethostname(), os.getpid(), now, now + 600)
        assert ledger.take_lease(held, holder_alive) is None
    deadline = time.monotonic() + 15
    while api_env.stats()["batch_rows_processed"] < 241 and time.monotonic() < deadline:
        time.sleep(0.1)  # the batch has ended: only the lease keeps collect away

    flow_run_id, finished = _run_flow(collect(state_dir=str(state_dir), return_state=True))
    asyncio.run(APILogHandler.aflush())

    assert finished == [] and not output.exists()

    async def read_logs() -> list[Log]:
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    logs = _eventually(read_logs, lambda found: any("skipped" in log.message for log in found))
    (skipped,) = [log.message for log in logs if "skipped" in log.message]
    assert waiting.run_key in skipped and f"pid {os.getpid()}" in skipped
    with Ledger.open(state_dir) as ledger:
        assert [run.status for run in ledger.runs()] == ["submitted"]
        ledger.release_lease(waiting.run_key, "another-worker")
    # Once the other process lets go, the next collect finishes the run.
    assert [summary.run_key for summary in _collect_until_finished(str(state_dir))] == [waiting.run_key]
    assert output.exists() and api_env.stats()["batches_created"] == 1


def test_logs_carry_batch_state_changes_and_lane_summaries_but_no_key_or_prompt(
    api_env: RunningEmulator, tmp_path: Path
) -> None:
    flow_run_id, _ = _run_flow(batch_orchestrator(**_params(tmp_path), return_state=True))
    asyncio.run(APILogHandler.aflush())

    async def read_logs() -> list[Log]:
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    def both_lanes_logged(found: list[Log]) -> bool:
        messages = [log.message for log in found]
        return any(m.startswith("realtime lane:") for m in messages) and any(
            m.startswith("batch lane:") for m in messages
        )

    logs = _eventually(read_logs, both_lanes_logged, timeout_s=60)
    messages = [log.message for log in logs]
    text = "\n".join(messages)
    assert any(m.startswith("batch msgbatch_") and m.endswith("created for chunk c0 (241 requests)") for m in messages)
    assert any(": ended succeeded=241" in m for m in messages)
    assert any(m.startswith("realtime lane: 63 tasks") for m in messages)
    assert any(m.startswith("batch lane: 1 batch submitted") for m in messages)
    plan_line = next(m for m in messages if m.startswith("run ") and "(241 batch, 63 realtime)" in m)
    assert plan_line.endswith("304 tasks (241 batch, 63 realtime), 0 rejected, 1 chunk")
    # Each phase logs on its own task run: the batch's lines on submit-c0 / collect-c0, the plan on plan.
    task_run_names = _task_run_names_by_id(flow_run_id)
    on = {log.message: task_run_names.get(log.task_run_id) for log in logs}
    assert {task for message, task in on.items() if message.startswith("batch msgbatch_")} == {
        "submit-c0",
        "collect-c0",
    }
    assert (on[plan_line] or "").startswith("plan")
    assert on[next(m for m in messages if m.startswith("batch lane:"))] is None  # the lane summary: flow run
    assert API_KEY not in text
    first_prompt = orjson.loads(SAMPLE_TASKS.read_bytes())[0]["input_data"]
    assert all(str(value) not in text for value in first_prompt.values() if len(str(value)) > 12)
    # Nor in the artifacts, nor in any byte the run wrote (output, ledger, usage log).
    published = "\n".join(f"{a.data} {a.description}" for a in _artifacts(flow_run_id).values())
    assert published and API_KEY not in published
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and not [path for path in written if API_KEY.encode() in path.read_bytes()]


def test_the_nightly_deployment_carries_the_cron_schedule() -> None:
    nightly, on_demand, collect_deployment = build_deployments(timezone="Europe/Berlin")

    assert nightly.name == "nightly" and nightly.flow_name == "batch-orchestrator"
    (schedule,) = nightly.schedules or []
    assert schedule.schedule.cron == NIGHTLY_CRON == "0 2 * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert nightly.parameters["input_path"] == "samples/nightly_tasks.json"
    assert not on_demand.schedules
    (every,) = collect_deployment.schedules or []
    assert every.schedule.interval.total_seconds() == 300
    # prefect.yaml (the work-pool path) declares the same schedule.
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (yaml_schedule,) = next(d for d in spec["deployments"] if d["name"] == "nightly")["schedules"]
    assert yaml_schedule["cron"] == NIGHTLY_CRON


def test_collect_finishes_the_other_runs_when_one_cannot_be_finished(api_env: RunningEmulator, tmp_path: Path) -> None:
    tasks = orjson.loads(SAMPLE_TASKS.read_bytes())
    changed, intact = tmp_path / "changed.json", tmp_path / "intact.json"
    changed.write_bytes(orjson.dumps(tasks[:40]))
    intact.write_bytes(orjson.dumps(tasks[40:80]))
    state_dir = tmp_path / "state"
    for path in (changed, intact):
        params = _params(tmp_path, input_path=str(path), output_path=str(path.with_suffix(".out.json")))
        _run_flow(batch_orchestrator(**dict(params, state_dir=str(state_dir)), wait=False, return_state=True))
    changed.write_bytes(orjson.dumps(tasks[:39]))  # edited while its batches were out

    async def go() -> State[Any]:
        return await collect(state_dir=str(state_dir), return_state=True)

    deadline = time.monotonic() + 15
    while not intact.with_suffix(".out.json").exists() and time.monotonic() < deadline:
        state = asyncio.run(go())
        time.sleep(0.3)

    assert state.is_failed()
    with pytest.raises(BatchEngineError, match=r"could not finish 1 of \d runs"):
        state.result()
    assert not changed.with_suffix(".out.json").exists()
    assert len(orjson.loads(intact.with_suffix(".out.json").read_bytes())["results"]) == 40
    with Ledger.open(state_dir) as ledger:
        assert sorted(run.status for run in ledger.runs()) == ["complete", "submitted"]

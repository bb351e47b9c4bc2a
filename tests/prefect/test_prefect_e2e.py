"""What a user does, non-interactively: a Prefect server, the deployments, `prefect deployment run ... --watch`.

One `prefect server start` per module, on a copy of the session's migrated database. Every process these tests
start is stopped by PID in a `finally`, and anything left carrying the module's temporary PREFECT_HOME is
killed at the end.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from batch_engine.render.artifacts import SUMMARY_KEY, TABLE_KEY
from tests.support.prefect_server import (
    PREFECT,
    ROOT,
    Server,
    pids_with_env,
    running_server,
    start_process,
    stop_process,
)

SAMPLES = ROOT / "samples"

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, migrated_prefect_db: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("prefect-home"), migrated_prefect_db) as started:
        yield started


def _client(server: Server) -> PrefectClient:
    return PrefectClient(api=server.api_url)


def _wait_for_deployment(server: Server, name: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    async def read() -> Any:
        async with _client(server) as client:
            return await client.read_deployment_by_name(name)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return asyncio.run(read())
        except Exception:
            time.sleep(0.3)
    pytest.fail(f"deployment {name} not registered after 60 s:\n{log.read_text()[-3000:]}")


def _flow_run_id(cli_output: str) -> UUID:
    match = re.search(r"UUID: ([0-9a-f-]{36})", cli_output)
    assert match, cli_output
    return UUID(match.group(1))


async def _run_state_and_artifacts(server: Server, flow_run_id: UUID) -> tuple[str, dict[str, Any]]:
    async with _client(server) as client:
        flow_run = await client.read_flow_run(flow_run_id)
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert flow_run.state is not None
    return flow_run.state.type.value, {artifact.key: artifact for artifact in artifacts if artifact.key}


def test_nightly_deployment_runs_end_to_end_with_deployment_run_watch(
    server: Server, emulator: Any, tmp_path: Path
) -> None:
    output = tmp_path / "nightly_results.json"
    state_dir = tmp_path / "state"
    env = dict(server.env, ANTHROPIC_BASE_URL=emulator.base_url, ANTHROPIC_API_KEY="sk-ant-e2e-test")
    serve_log = tmp_path / "serve.log"
    serve = start_process([sys.executable, str(ROOT / "flows" / "serve.py")], env, serve_log)
    try:
        deployment = _wait_for_deployment(server, "batch-orchestrator/nightly", serve, serve_log)
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == "0 2 * * *"
        assert schedule.schedule.timezone == "UTC"
        assert schedule.active

        run = subprocess.run(
            [
                str(PREFECT),
                "deployment",
                "run",
                "batch-orchestrator/nightly",
                "--param",
                f"input_path={SAMPLES / 'nightly_tasks.json'}",
                "--param",
                f"output_path={output}",
                "--param",
                f"state_dir={state_dir}",
                "--param",
                "poll_interval_s=0.2",
                "--watch",
                "--watch-timeout",
                "90",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            # `--watch` has been seen hanging after the run completed (prefect #19989, #17817).
            timeout=110,
        )
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- serve log ---\n{serve_log.read_text()[-4000:]}"
    finally:
        stop_process(serve)
    # The serve process and every flow-run process it started are gone; only the server is left.
    assert pids_with_env(f"PREFECT_HOME={server.home}".encode()) == [server.pid]

    state, artifacts = asyncio.run(_run_state_and_artifacts(server, _flow_run_id(run.stdout)))
    assert state == "COMPLETED"
    assert {SUMMARY_KEY, TABLE_KEY} <= artifacts.keys()
    assert "304: 304 succeeded, 0 failed, 0 rejected" in artifacts[SUMMARY_KEY].data
    assert "Total: 304 tasks" in (artifacts[TABLE_KEY].description or "")

    inputs = orjson.loads((SAMPLES / "nightly_tasks.json").read_bytes())
    written = orjson.loads(output.read_bytes())
    assert [row["task_id"] for row in written["results"]] == [task["task_id"] for task in inputs]
    assert all(row["status"] == "succeeded" for row in written["results"])
    assert {row["route"] for row in written["results"]} == {"batch", "realtime"}


def test_prefect_yaml_registers_nightly_on_demand_and_collect_on_the_process_pool(server: Server) -> None:
    async def create_pool() -> None:
        async with _client(server) as client:
            await client.create_work_pool(WorkPoolCreate(name="batch-engine", type="process"))

    asyncio.run(create_pool())
    deploy = subprocess.run(
        [str(PREFECT), "--no-prompt", "deploy", "--all"],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert deploy.returncode == 0, f"{deploy.stdout}\n{deploy.stderr}"

    async def read(name: str) -> Any:
        async with _client(server) as client:
            return await client.read_deployment_by_name(name)

    nightly = asyncio.run(read("batch-orchestrator/nightly"))
    on_demand = asyncio.run(read("batch-orchestrator/on-demand"))
    collect = asyncio.run(read("batch-collect/collect"))
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    yaml_nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")

    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == yaml_nightly["schedules"][0]["timezone"] == "UTC"
    assert nightly.work_pool_name == on_demand.work_pool_name == collect.work_pool_name == "batch-engine"
    assert nightly.parameters["input_path"] == "samples/nightly_tasks.json"
    assert on_demand.schedules == []
    (collect_schedule,) = collect.schedules
    assert collect_schedule.schedule.interval.total_seconds() == 300
    # The pull step recorded the repository, so relative sample paths resolve on the worker.
    assert str(ROOT) in orjson.dumps(nightly.pull_steps).decode()

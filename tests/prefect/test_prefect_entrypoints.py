"""Every `prefect.yaml` entrypoint, loaded by its file path the way Prefect loads it, runs against a real server.

`prefect deploy` and a worker load `flows/<file>.py:<flow>` by path (`load_flow_from_entrypoint`, which puts the
file's directory on `sys.path`), and `python flows/batch_orchestrator.py` serves a deployment from the file itself
(`flow.serve()`). Both broke once without any test noticing: `flows/secrets.py` shadowed the standard library's
`secrets`, so every flow loaded by path died in pydantic's `import secrets` before it started.

Here, against one `prefect server start` (the same fixture as the schedules test): `python flows/batch_orchestrator.py`
serves `batch-orchestrator/on-demand`; each entrypoint is loaded in a subprocess of its own, by path, with no
placeholder fallback, and called: `batch_orchestrator` on the emulator, `collect` on an empty state dir, and
`batch_sharded`, whose two shards run as on-demand runs in the serve process. Every flow run ends Completed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import orjson
import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint

from tests.support.engine import generated_tasks, read_output, write_jsonl
from tests.support.prefect_server import ROOT, Server, running_server, start_process, stop_process

# Under a load of ~10 on 2 cores: server ~20-50 s, each Python process importing Prefect ~5-15 s.
pytestmark = pytest.mark.timeout(480)

# Loads the entrypoint as Prefect does, by path (a ScriptError is not hidden behind a placeholder flow), and calls
# the flow with the JSON parameters; prints the final state.
LOAD_AND_CALL = """
import asyncio, inspect, sys
import cloudpickle
import orjson
from prefect.flows import load_flow_from_entrypoint

flow = load_flow_from_entrypoint(sys.argv[1], use_placeholder_flow=False)
state = flow(**orjson.loads(sys.argv[2]), return_state=True)
if inspect.isawaitable(state):
    state = asyncio.run(state)
print("FINAL", flow.name, state.type.value, state.message)
"""


def _entrypoints() -> list[str]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return sorted({deployment["entrypoint"] for deployment in spec["deployments"]})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, migrated_prefect_db: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("prefect-home"), migrated_prefect_db) as started:
        yield started


def _parameters(entrypoint: str, work: Path) -> dict[str, Any]:
    tasks = write_jsonl(work / "tasks.jsonl", generated_tasks(8, realtime_every=2))
    common = {"state_dir": str(work / "state")}
    if entrypoint.endswith(":batch_orchestrator"):
        return {**common, "input_path": str(tasks), "output_path": str(work / "out.json"), "emulate": True}
    if entrypoint.endswith(":collect"):
        return common
    if entrypoint.endswith(":batch_sharded"):
        return {**common, "input_path": str(tasks), "output_path": str(work / "out.json"), "emulate": True}
    raise AssertionError(f"no parameters for the new entrypoint {entrypoint}: add them here")


def _wait_for_deployment(server: Server, name: str, serve: subprocess.Popen[bytes], log: Path) -> None:
    async def registered() -> bool:
        async with PrefectClient(api=server.api_url) as client:
            try:
                await client.read_deployment_by_name(name)
            except ObjectNotFound:
                return False
            return True

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            pytest.fail(f"serve exited with {serve.returncode}:\n{log.read_text()[-3000:]}")
        if asyncio.run(registered()):
            return
        time.sleep(0.5)
    pytest.fail(f"deployment {name} not registered after 120 s:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("entrypoint", _entrypoints())
def test_a_flow_sent_to_a_spawned_process_still_validates_its_parameters(entrypoint: str, tmp_path: Path) -> None:
    # `flow.serve()` runs each flow run in a spawned process and sends it the flow with cloudpickle, which copies
    # the flow's function by value: the copy must still resolve every type its parameters are annotated with.
    flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    parameters = _parameters(entrypoint, tmp_path)
    copy = cloudpickle.loads(cloudpickle.dumps(flow))
    assert copy.validate_parameters(parameters) == flow.validate_parameters(parameters)


def _completed_runs(server: Server) -> list[str]:
    async def read() -> list[str]:
        async with PrefectClient(api=server.api_url) as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))
                )
            )
        return sorted(run.name for run in runs)

    return asyncio.run(read())


def test_every_prefect_yaml_entrypoint_loads_by_path_and_runs_to_completed(server: Server, tmp_path: Path) -> None:
    entrypoints = _entrypoints()
    assert entrypoints == [
        "flows/batch_orchestrator.py:batch_orchestrator",
        "flows/batch_orchestrator.py:collect",
        "flows/sharded.py:batch_sharded",
    ]
    env = {key: value for key, value in server.env.items() if not key.startswith("ANTHROPIC_")}
    serve_log = tmp_path / "serve.log"
    # `flow.serve()` from the entrypoint file: the shards of batch_sharded run as its on-demand runs.
    serve = start_process([sys.executable, "flows/batch_orchestrator.py"], env, serve_log, ROOT)
    try:
        _wait_for_deployment(server, "batch-orchestrator/on-demand", serve, serve_log)
        for entrypoint in entrypoints:
            work = tmp_path / entrypoint.rpartition(":")[2]
            work.mkdir()
            parameters = _parameters(entrypoint, work)
            called = subprocess.run(
                [sys.executable, "-c", LOAD_AND_CALL, entrypoint, orjson.dumps(parameters).decode()],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            final = [line for line in called.stdout.splitlines() if line.startswith("FINAL ")]
            assert called.returncode == 0 and final, (
                f"{entrypoint}: exit {called.returncode}\n{called.stdout[-3000:]}\n{called.stderr[-3000:]}\n"
                f"--- serve log ---\n{serve_log.read_text()[-3000:]}"
            )
            assert final[0].split()[2] == "COMPLETED", final[0]
            if "out.json" in str(parameters.get("output_path")):
                run, rows = read_output(work / "out.json")
                assert [row["task_id"] for row in rows] == [f"t{i}" for i in range(8)]
                assert run["counts"]["succeeded"] == 8 and run["simulated"]
    finally:
        stop_process(serve)
    # Three flow runs of the entrypoints and the two shard runs the serve process ran for batch_sharded.
    assert len(_completed_runs(server)) == 5
    assert "Traceback" not in serve_log.read_text()

"""Schedules that fire: a real `prefect server start` with a one-second scheduler loop, the deployments of
`prefect.yaml`, and a process worker.

The deployment tests elsewhere only read a schedule's settings back; this one waits for the server's scheduler
to create the runs, which is what broke on a fresh install (SQLAlchemy 2.1 made every scheduler loop raise, so
no run was ever created while the UI showed the schedules switched on).

The server's output goes to `$BATCH_ENGINE_TEST_LOG_DIR/prefect-server-scheduler.log` when that variable is set
(`.ci/run` sets it and checks the file for tracebacks afterwards), else into the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import FlowRun

from tests.support.prefect_server import PREFECT, ROOT, pids_with_env, running_server, start_process, stop_process

# Measured on the 2-core machine shared with other test suites: at load ~9, 118 s (server healthy 49 s, `prefect
# deploy` 47 s, nightly runs 1 s later, a collect run Completed 18 s later); at load ~13, 239 s (`prefect deploy`
# alone 113 s); plus the session's one-time database migration (63-67 s). Nearly all of it is Python start-up of
# the Prefect processes under CPU contention, hence the generous limit.
pytestmark = pytest.mark.timeout(420)

SERVER_LOG_NAME = "prefect-server-scheduler.log"
# A frame of the scheduler service in a traceback: what every loop logged with SQLAlchemy 2.1 (`.ci/run` greps the
# server log for it too). Other server errors under load ("database is locked" from SQLite) are not this test's.
SCHEDULER_FRAME = "prefect/server/services/scheduler.py"
FAST_LOOPS = {
    # The scheduler looks for deployments to schedule every second (default 60 s), the worker for runs every second
    # (default 10 s).
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    # 3 runs ahead per deployment instead of up to 100 (a 5 s interval would make 100), and no marking of runs
    # `Late`: fewer SQLite writes, which otherwise hit "database is locked" on a loaded 2-core machine.
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "3",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
}
# `collect` runs every 300 s in prefect.yaml; the copy deployed here runs every 5 s, so a run is due at once.
TEST_INTERVAL_S = 5


def _server_log(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("BATCH_ENGINE_TEST_LOG_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / SERVER_LOG_NAME
    log.unlink(missing_ok=True)
    return log


def _project_copy(tmp_path: Path) -> Path:
    """prefect.yaml and the flows in a directory of their own, so the worker's runs (relative `state_dir` and
    output paths) never touch the repository; only the `collect` interval is shortened."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "flows").symlink_to(ROOT / "flows")
    (project / "samples").symlink_to(ROOT / "samples")
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (collect,) = (d for d in spec["deployments"] if d["name"] == "collect")
    collect["schedules"][0]["interval"] = TEST_INTERVAL_S
    (project / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return project


async def _runs_of(api_url: str, deployment: str) -> list[FlowRun]:
    async with PrefectClient(api=api_url) as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
        )


def _wait_for(what: str, check: Callable[[], list[FlowRun]], log: Path, timeout_s: float) -> list[FlowRun]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} after {timeout_s:.0f} s; server log:\n{log.read_text()[-4000:]}")


def test_the_scheduler_creates_nightly_runs_and_a_worker_completes_an_interval_run(
    tmp_path: Path, migrated_prefect_db: Path
) -> None:
    log = _server_log(tmp_path)
    project = _project_copy(tmp_path)
    home = tmp_path / "prefect-home"
    home.mkdir()
    started = time.monotonic()
    with running_server(home, migrated_prefect_db, extra_env=FAST_LOOPS, log=log) as server:

        async def create_pool() -> None:
            async with PrefectClient(api=server.api_url) as client:
                await client.create_work_pool(WorkPoolCreate(name="batch-engine", type="process"))

        asyncio.run(create_pool())
        stamps = [f"server healthy {time.monotonic() - started:.1f} s"]
        # Started before the deploy so that its start-up overlaps it.
        worker_log = tmp_path / "worker.log"
        worker = start_process(
            [str(PREFECT), "worker", "start", "--pool", "batch-engine"], server.env, worker_log, project
        )
        try:
            deploy = subprocess.run(
                [str(PREFECT), "--no-prompt", "deploy", "--name", "nightly", "--name", "collect"],
                cwd=project,
                env=server.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert deploy.returncode == 0, f"{deploy.stdout}\n{deploy.stderr}"
            stamps.append(f"deployed {time.monotonic() - started:.1f} s")

            def nightly_runs() -> list[FlowRun]:
                runs = asyncio.run(_runs_of(server.api_url, "nightly"))
                return [run for run in runs if run.state is not None and run.state.type.value == "SCHEDULED"]

            scheduled = _wait_for("the scheduler created no nightly run", nightly_runs, log, timeout_s=45)
            stamps.append(f"nightly runs scheduled {time.monotonic() - started:.1f} s")
            now = datetime.now(UTC)
            # The scheduler creates at least 3 runs ahead; every one at 02:00 UTC, in the future.
            assert len(scheduled) >= 3
            for run in scheduled:
                assert run.expected_start_time is not None
                start = run.expected_start_time.astimezone(UTC)
                assert (start.hour, start.minute) == (2, 0) and start > now

            def completed_collect_runs() -> list[FlowRun]:
                runs: list[Any] = asyncio.run(_runs_of(server.api_url, "collect"))
                return [run for run in runs if run.state is not None and run.state.type.value == "COMPLETED"]

            done = _wait_for("no scheduled collect run completed", completed_collect_runs, worker_log, timeout_s=120)
            stamps.append(f"collect run completed {time.monotonic() - started:.1f} s")
        finally:
            stop_process(worker)
        assert done[0].auto_scheduled  # made by the scheduler, not by hand
        # Its final state says what it did: nothing was waiting in the fresh state dir.
        assert done[0].state is not None and done[0].state.message == "0 of 0 waiting runs finished"
        # The worker's flow-run subprocesses exit a moment after it: wait for them, then nothing but the server.
        marker = f"PREFECT_HOME={server.home}".encode()
        deadline = time.monotonic() + 60  # a collect run the worker started just before it stopped runs to its end
        while pids_with_env(marker) != [server.pid] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pids_with_env(marker) == [server.pid]

    server_output = log.read_text()
    assert SCHEDULER_FRAME not in server_output, server_output[-4000:]
    print("; ".join(stamps))

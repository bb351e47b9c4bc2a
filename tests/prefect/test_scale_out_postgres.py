"""Any worker resumes any shard: one PostgreSQL for Prefect's server and for batch_engine's state, two serve
processes (two "workers") sharing nothing on disk for state, a sharded batch job, and the worker running a shard
SIGKILLed while its batch runs. The sharded flow sees the shard's run lease held by nobody, marks that flow run
Crashed and runs the shard again; the other worker takes the lease over and re-attaches to the recorded batch.
The emulator proves it: one batch created per shard chunk, no custom_id in two batches, no success billed twice.

The sharded flow itself runs in a process of its own (the machine the job is started from), so the worker that
is killed is never the one waiting on the shards. Every process is stopped by PID in a `finally`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prefect.client.orchestration import PrefectClient

from batch_engine.state.backend import open_ledger
from batch_engine.state.url import ENV_STATE_URL, parse_state_url
from tests.prefect.test_scale_out import _wait_until_served
from tests.support.engine import write_jsonl
from tests.support.postgres import PostgresServer
from tests.support.prefect_server import ROOT, pids_with_env, running_server, start_process, stop_process

pytestmark = pytest.mark.timeout(600)

TASKS = 200
SHARDS = 2
# One flow run at a time per worker, so the two shards start on different workers. A worker killed while a shard
# run waits in its queue, before that run took its lease, is not detected (README "Several machines": limits).
ONE_RUN_EACH = ("--limit", "1")
BATCH_DURATION_S = 12  # long enough to kill a worker while its shard's batch runs


def _start_emulator(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    log = tmp_path / "emulator.log"
    command = [str(Path(sys.executable).with_name("batch-engine")), "emulator", "--port", "0"]
    proc = start_process([*command, "--batch-duration", f"{BATCH_DURATION_S}s"], env, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"ANTHROPIC_BASE_URL=(\S+)", log.read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_process(proc)
    pytest.fail(f"emulator did not start:\n{log.read_text()[-2000:]}")


def _shard_in_its_batch(state_url: str, deadline_s: float, sharded: subprocess.Popen[bytes], log: Path) -> int:
    """The pid of a process holding a shard's run lease once that shard's batch is recorded (created, running)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if sharded.poll() is not None:
            pytest.fail(f"the sharded job exited early:\n{log.read_text()[-4000:]}")
        with open_ledger(parse_state_url(state_url)) as ledger:
            for record in ledger.runs("running"):
                lease = ledger.lease(record.run_key)
                if lease is not None and any(chunk.batch_id for chunk in ledger.chunks(record.run_key)):
                    return lease.pid
        time.sleep(0.2)
    pytest.fail(f"no shard recorded a batch in {deadline_s:.0f} s:\n{log.read_text()[-4000:]}")


def _flow_runs(api_url: str) -> list[tuple[str, str]]:
    async def read() -> list[tuple[str, str]]:
        async with PrefectClient(api=api_url) as client:
            runs = await client.read_flow_runs()
            return [(str(run.parameters.get("input_path", "")), run.state.name if run.state else "") for run in runs]

    return asyncio.run(read())


def test_a_shard_whose_worker_is_killed_mid_batch_is_finished_by_the_other_worker_with_one_create_per_chunk(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    prefect_db = postgres_server.create_database()
    state_url = postgres_server.create_database()
    home = tmp_path / "prefect-home"
    home.mkdir()
    unused_sqlite = tmp_path / "unused-prefect.db"
    unused_sqlite.touch()  # running_server copies a SQLite database; this server's database is PostgreSQL
    on_postgres = {"PREFECT_API_DATABASE_CONNECTION_URL": prefect_db.replace("postgresql://", "postgresql+asyncpg://")}
    tasks = [
        {"task_id": f"s{i}", "task_type": "classify_bulk", "input_data": {"text": f"text {i}"}} for i in range(TASKS)
    ]
    input_path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    output_path = tmp_path / "merged.json"

    # Migrated first, as `migrated_prefect_db` does for SQLite: a server migrating a new database on a loaded
    # 2-core machine is not healthy within the minute `running_server` waits.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **on_postgres)
    upgrade = [str(Path(sys.executable).with_name("prefect")), "server", "database", "upgrade", "-y"]
    subprocess.run(upgrade, env=env, check=True, capture_output=True, timeout=400)
    with running_server(home, unused_sqlite, extra_env=on_postgres) as server:
        emulator, base_url = _start_emulator(tmp_path, server.env)
        serves: list[tuple[subprocess.Popen[bytes], Path]] = []
        sharded: subprocess.Popen[bytes] | None = None
        try:
            worker_env = dict(
                server.env,
                ANTHROPIC_BASE_URL=base_url,
                ANTHROPIC_API_KEY="sk-ant-scale-out-test",
                **{ENV_STATE_URL: state_url},
            )
            for number in range(2):
                # Each worker in its own directory: nothing of the state is on a disk they share.
                cwd = tmp_path / f"worker-{number}"
                cwd.mkdir()
                log = tmp_path / f"serve-{number}.log"
                serves.append(
                    (
                        start_process(
                            [sys.executable, str(ROOT / "flows" / "serve.py"), *ONE_RUN_EACH], worker_env, log, cwd=cwd
                        ),
                        log,
                    )
                )
            _wait_until_served(server.api_url, serves)

            parameters: dict[str, Any] = {
                "input_path": str(input_path),
                "output_path": str(output_path),
                "shards": SHARDS,
                # Only the shard files (inputs) and outputs: shared storage, as a user's input and output paths are.
                "state_dir": str(tmp_path / "shared"),
                "config_path": str(ROOT / "samples" / "config.toml"),
                "poll_interval_s": 0.5,
                "mode": "batch",
                "worker_check_s": 1.0,
            }
            job_log = tmp_path / "sharded.log"
            script = "import asyncio, sys, orjson\nfrom flows.sharded import batch_sharded\n"
            script += "asyncio.run(batch_sharded(**orjson.loads(sys.argv[1])))\n"
            sharded = start_process(
                [sys.executable, "-c", script, orjson.dumps(parameters).decode()], worker_env, job_log
            )

            victim_pid = _shard_in_its_batch(state_url, 240, sharded, job_log)
            victim = next(proc for proc, _ in serves if os.getpgid(victim_pid) == proc.pid)
            os.killpg(victim.pid, signal.SIGKILL)  # the worker and the flow run it was running, mid-batch
            victim.wait(10)
            survivor_log = next(log for proc, log in serves if proc is not victim)

            try:
                sharded.wait(300)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the sharded job did not finish:\n{job_log.read_text()[-4000:]}")
            job_text = job_log.read_text()
            assert sharded.returncode == 0, job_text[-4000:] + "\n--- survivor ---\n" + survivor_log.read_text()[-4000:]
            stats = httpx.get(f"{base_url}/_emulator/stats", timeout=5).json()
            flow_runs = _flow_runs(server.api_url)
        finally:
            if sharded is not None:
                stop_process(sharded)
            for proc, _ in serves:
                stop_process(proc)
            stop_process(emulator)
        assert not pids_with_env(f"{ENV_STATE_URL}={state_url}".encode())

    document = orjson.loads(output_path.read_bytes())
    rows = document["results"]
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert all(row["status"] == "succeeded" and row["route"] == "batch" for row in rows)
    assert "is gone (its run lease is held by nobody)" in job_text
    # The killed shard's flow run is Crashed; it ran again (a third shard run), and both shards completed.
    shard_runs = [state for path, state in flow_runs if "shard-" in path]
    assert sorted(shard_runs) == ["Completed", "Completed", "Crashed"], flow_runs
    # One create per chunk: the re-run re-attached to the killed worker's batch instead of creating another.
    assert stats["batches_created"] == SHARDS
    assert stats["duplicate_custom_ids_across_batches"] == 0
    assert stats["duplicate_succeeded_custom_ids"] == 0
    with open_ledger(parse_state_url(state_url)) as ledger:
        runs = ledger.runs()
        assert sorted(run.status for run in runs) == ["complete"] * SHARDS
        assert sorted(len(ledger.chunks(run.run_key)) for run in runs) == [1] * SHARDS

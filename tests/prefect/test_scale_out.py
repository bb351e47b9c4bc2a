"""Scale-out, as a user would run it on one machine: a Prefect server, two serve processes (two "workers"), one
emulator enforcing an RPM limit as its own process, a global rate limit in Prefect, and a sharded realtime-heavy
run of 2,000 tasks through `prefect deployment run batch-sharded/sharded`; and, without any server, what the
sharded flow hands each shard run (its share of the cost cap) and what the served deployments default to.

Every process is stopped by PID in a `finally`; anything left with the test's PREFECT_HOME is killed at the end.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from batch_engine.emulator import emulator_process as start_emulator_process
from batch_engine.orchestration.deployments import _parse_args, build_deployments, scale_out_deployments
from batch_engine.orchestration.sharded import ShardFile, shard_parameters
from batch_engine.planning.shards import shard_specs
from batch_engine.state.ledger import Ledger
from tests.support.engine import messages_calls, write_jsonl
from tests.support.prefect_server import PREFECT, ROOT, pids_with_env, running_server, start_process, stop_process

pytestmark = pytest.mark.timeout(180)

TASKS = 2000
SHARDS = 2
EMULATOR_RPM = 1500
# The global limit is below what the emulator allows: if it holds, the emulator never has to refuse anything.
GLOBAL_RPM = 1320
LIMIT_NAME = "anthropic-rpm"
BATCH_EVERY = 20  # every 20th task is a batch task; the rest go realtime
MODEL = "claude-haiku-5-5"  # what both task types run on (the "cheap" tier)
MAX_COST_USD = 100.0  # far above the run's estimate: split into two caps of $50, one per shard


def _tasks() -> list[dict[str, Any]]:
    tasks = []
    for i in range(TASKS):
        if i % BATCH_EVERY == 0:
            tasks.append({"task_id": f"s{i}", "task_type": "classify_bulk", "input_data": {"text": f"t {i}"}})
        else:
            tasks.append({"task_id": f"s{i}", "task_type": "user_query", "input_data": {"question": f"q {i}?"}})
    return tasks


class StatsSampler:
    """Polls the emulator's counters in a thread: (monotonic seconds, POST /v1/messages calls so far)."""

    def __init__(self, base_url: str) -> None:
        self.url = f"{base_url}/_emulator/stats"
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self._stop.is_set():
                try:
                    stats = client.get(self.url).json()
                except httpx.HTTPError:
                    pass
                else:
                    self.samples.append((time.monotonic(), sum(messages_calls(stats).values())))
                self._stop.wait(0.25)

    def __enter__(self) -> StatsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def worst_window_excess(samples: list[tuple[float, int]], limit_per_minute: float) -> float:
    """The largest amount by which calls in any window exceeded what a `limit_per_minute` token bucket (full at
    the start) allows in that window: count <= limit + rate * duration. Negative when always within."""
    rate = limit_per_minute / 60
    worst = -float("inf")
    for i, (t0, c0) in enumerate(samples):
        for t1, c1 in samples[i + 1 :]:
            worst = max(worst, (c1 - c0) - (limit_per_minute + rate * (t1 - t0)))
    return worst


@pytest.fixture
def prefect_server(tmp_path: Path, migrated_prefect_db: Path) -> Iterator[tuple[str, dict[str, str], Path]]:
    home = tmp_path / "prefect-home"
    home.mkdir()
    with running_server(home, migrated_prefect_db) as server:
        yield server.api_url, server.env, server.home


def _wait_until_served(api_url: str, serves: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    async def registered() -> bool:
        async with PrefectClient(api=api_url) as client:
            for name in ("batch-sharded/sharded", "batch-orchestrator/on-demand"):
                await client.read_deployment_by_name(name)
        return True

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for proc, log in serves:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        # Both processes must be polling before the run, or the first one up takes every shard.
        if all("being served" in log.read_text() for _, log in serves):
            try:
                if asyncio.run(registered()):
                    return
            except Exception:
                pass
        time.sleep(0.3)
    pytest.fail("deployments not served after 60 s:\n" + "\n---\n".join(log.read_text()[-2000:] for _, log in serves))


def test_sharded_run_on_two_workers_is_complete_in_order_and_stays_under_the_global_rate_limit(
    prefect_server: tuple[str, dict[str, str], Path], tmp_path: Path
) -> None:
    started = time.monotonic()
    api_url, env, home = prefect_server

    async def create_limit() -> None:
        # What `prefect gcl create anthropic-rpm --limit 1320 --slot-decay-per-second 22` does.
        async with PrefectClient(api=api_url) as client:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=LIMIT_NAME, limit=GLOBAL_RPM, slot_decay_per_second=GLOBAL_RPM / 60)
            )

    asyncio.run(create_limit())
    tasks = _tasks()
    input_path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    output_path = tmp_path / "merged.json"
    state_dir = tmp_path / "state"

    emulator = start_emulator_process("--rpm", str(EMULATOR_RPM), "--batch-duration", "0.2s", env=env)
    with emulator as running:
        base_url = running.base_url
        serves: list[tuple[subprocess.Popen[bytes], Path]] = []
        try:
            worker_env = dict(env, ANTHROPIC_BASE_URL=base_url, ANTHROPIC_API_KEY="sk-ant-scale-out-test")
            for number in range(2):
                log = tmp_path / f"serve-{number}.log"
                serves.append((start_process([sys.executable, str(ROOT / "flows" / "serve.py")], worker_env, log), log))
            _wait_until_served(api_url, serves)

            parameters = {
                "input_path": str(input_path),
                "output_path": str(output_path),
                "shards": SHARDS,
                "state_dir": str(state_dir),
                "config_path": str(ROOT / "samples" / "config.toml"),
                "poll_interval_s": 0.3,
                # The per-model form: the model both task types run on, under the one limit.
                "global_rate_limit": {MODEL: LIMIT_NAME},
                "max_cost_usd": MAX_COST_USD,
            }
            with StatsSampler(base_url) as sampler:
                run = subprocess.run(
                    [
                        *(str(PREFECT), "deployment", "run", "batch-sharded/sharded"),
                        *("--params", orjson.dumps(parameters).decode(), "--watch", "--watch-timeout", "120"),
                    ],
                    cwd=ROOT,
                    env=worker_env,
                    capture_output=True,
                    text=True,
                    timeout=140,
                )
            stats = httpx.get(f"{base_url}/_emulator/stats", timeout=5).json()
            serve_logs = [log.read_text() for _, log in serves]
            assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- serve logs ---\n" + "\n---\n".join(
                text[-4000:] for text in serve_logs
            )
        finally:
            for proc, _ in serves:
                stop_process(proc)
    # The serve processes and every flow-run process they started are gone; only the server is left.
    assert len(pids_with_env(f"PREFECT_HOME={home}".encode())) == 1

    document = orjson.loads(output_path.read_bytes())
    rows = document["results"]
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert [row["index"] for row in rows] == list(range(TASKS))
    assert all(row["status"] == "succeeded" for row in rows)
    summary = document["run"]
    assert summary["counts"]["total"] == summary["counts"]["succeeded"] == TASKS
    assert len(summary["shards"]) == SHARDS
    assert len({shard["run_key"] for shard in summary["shards"]}) == SHARDS
    # Each shard run got (and recorded) its half of the cap, not the whole of it.
    with Ledger.open(state_dir) as ledger:
        assert sorted(run.options["max_cost_usd"] for run in ledger.runs()) == [MAX_COST_USD / SHARDS] * SHARDS

    # No batch duplicated across shards: one batch per shard, each custom_id in exactly one batch.
    assert stats["batches_created"] == SHARDS
    assert stats["duplicate_custom_ids_across_batches"] == 0
    calls = messages_calls(stats)
    requests = sum(calls.values())
    rate_limited = calls.get("429", 0)
    assert requests >= TASKS - TASKS // BATCH_EVERY
    assert rate_limited / requests < 0.02, calls

    # The two shards' combined rate stayed within the global limit (a token bucket full at the start). Slack: a
    # block of slots taken just before a window may be spent inside it, one block per shard.
    excess = worst_window_excess(sampler.samples, GLOBAL_RPM)
    block = 32
    assert excess <= SHARDS * block, excess
    first = next(t for t, count in sampler.samples if count > 0)
    last = next(t for t, count in sampler.samples if count >= requests)
    print(
        f"\nscale-out: {requests} realtime requests, {rate_limited} 429s ({100 * rate_limited / requests:.2f}%), "
        f"sending {last - first:.1f} s (avg {60 * requests / (last - first):.0f}/min), global limit {GLOBAL_RPM}/min "
        f"+ burst, worst window excess {excess:.0f}, test {time.monotonic() - started:.1f} s"
    )


def test_each_shard_run_gets_its_share_of_max_cost_usd_and_the_common_parameters(tmp_path: Path) -> None:
    files = [
        ShardFile(spec, tmp_path / f"shard-{spec.number}.jsonl", tmp_path / f"shard-{spec.number}.results.json")
        for spec in shard_specs(10, 3)
    ]
    limit = {"claude-haiku-5-5": "haiku-rpm"}
    common = {"mode": None, "global_rate_limit": limit, "emulate": False}

    runs = shard_parameters(files, common, state_dir="/state", shard_state_dir=None, max_cost_usd=1.0)

    # 4, 3 and 3 records of 10: never more than the cap in total, each shard enforcing its own part.
    assert [run["max_cost_usd"] for run in runs] == [0.4, 0.3, 0.3]
    assert all(run["global_rate_limit"] == limit and "mode" not in run and run["wait"] for run in runs)
    assert [run["input_path"] for run in runs] == [str(f.input_path) for f in files]
    uncapped = shard_parameters(files, common, state_dir="/state", shard_state_dir="/local", max_cost_usd=None)
    assert not [run for run in uncapped if "max_cost_usd" in run]
    assert [run["state_dir"] for run in uncapped] == ["/local/shard-000", "/local/shard-001", "/local/shard-002"]


def test_served_deployments_default_to_the_global_rate_limit_given_to_serve() -> None:
    limit = {"claude-haiku-5-5": "haiku-rpm", "*": "anthropic-rpm"}
    assert _parse_args(["--global-rate-limit", orjson.dumps(limit).decode()]).global_rate_limit == limit
    assert _parse_args(["--global-rate-limit", "anthropic-rpm"]).global_rate_limit == "anthropic-rpm"

    deployments = [*build_deployments(global_rate_limit=limit), *scale_out_deployments(limit)]

    assert {d.name: d.parameters["global_rate_limit"] for d in deployments} == dict.fromkeys(
        ("nightly", "on-demand", "collect", "sharded"), limit
    )
    assert not [d for d in (*build_deployments(), *scale_out_deployments()) if "global_rate_limit" in d.parameters]

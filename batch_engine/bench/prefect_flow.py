"""What Prefect costs on top of the engine: `python -m batch_engine.bench.prefect_flow --tasks 10000`.

Runs the same all-realtime task file through `batch_engine.runner.run` and through the `batch-orchestrator`
flow, alternately, against a zero-latency emulator in its own process, and prints the wall times, the ratio and
the number of Prefect task runs per flow run. The Prefect API (PREFECT_API_URL, else Prefect's temporary server)
is started before anything is timed: its start-up is a per-process cost a deployment does not pay per run.

Wall time on a shared 2-core machine moves with whatever else runs, so CPU seconds are reported too: those of
this process (engine, SDK client, Prefect's client threads) and, for the flow, those the temporary Prefect
server spent recording the run (when this process started it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import orjson
from pydantic import SecretStr

from batch_engine.bench.engine import print_result
from batch_engine.client import ApiSettings
from batch_engine.config import default_config_text, load_config
from batch_engine.emulator import emulator_process
from batch_engine.runner import RunOptions, run

_TYPES = [
    ("classify_bulk", {"text": "The checkout page fails after payment."}),
    ("summarize", {"document": "A postmortem timeline entry. " * 20}),
    ("user_query", {"question": "Where are the daily aggregates?"}),
]
# No client-side limit may be the bottleneck: the point is the orchestration overhead, not rate limiting.
_UNLIMITED = {"rpm": 100_000_000, "itpm": 10_000_000_000, "otpm": 10_000_000_000}


def _write_tasks(path: Path, count: int) -> None:
    with path.open("wb") as handle:
        for i in range(count):
            task_type, data = _TYPES[i % len(_TYPES)]
            record = {"task_id": f"t{i}", "task_type": task_type, "input_data": {**data, "n": i}}
            handle.write(orjson.dumps(record) + b"\n")


def _write_config(path: Path, concurrency: int) -> None:
    text = default_config_text()
    for key, value in {**_UNLIMITED, "realtime_concurrency": concurrency}.items():
        text, found = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
        if not found:
            raise KeyError(f"no [limits] key {key} in the shipped config")
    path.write_text(text, encoding="utf-8")


async def _task_run_count(flow_run_id: UUID, settle_s: float = 3.0, timeout_s: float = 60.0) -> int:
    """Task runs the API shows for the flow run, once the count has stopped changing (they arrive as events)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    seen, stable_since, deadline = -1, time.monotonic(), time.monotonic() + timeout_s
    async with get_client() as client:
        while time.monotonic() < deadline:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) != seen:
                seen, stable_since = len(runs), time.monotonic()
            elif time.monotonic() - stable_since >= settle_s:
                break
            await asyncio.sleep(0.5)
    return seen


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of another process so far (0 when unknown)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_prefect(tasks: int, rounds: int, concurrency: int) -> dict[str, Any]:
    """Median wall and CPU time of the engine alone and of the flow on the same file; task runs per flow run."""
    from batch_engine.orchestration.ephemeral import start_ephemeral_server
    from batch_engine.orchestration.orchestrator import batch_orchestrator

    server_pid = start_ephemeral_server()
    engine_s: list[float] = []
    flow_s: list[float] = []
    engine_cpu: list[float] = []
    flow_cpu: list[float] = []
    server_cpu: list[float] = []
    task_runs: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        input_path, config_path = work / "tasks.jsonl", work / "config.toml"
        _write_tasks(input_path, tasks)
        _write_config(config_path, concurrency)
        config = load_config(config_path)
        with emulator_process("--config", str(config_path)) as emulator:
            api = ApiSettings(SecretStr("sk-bench"), emulator.base_url)
            os.environ["ANTHROPIC_API_KEY"], os.environ["ANTHROPIC_BASE_URL"] = "sk-bench", emulator.base_url
            for number in range(rounds):
                httpx.post(f"{emulator.base_url}/_emulator/reset").raise_for_status()
                state = work / f"engine-{number}"
                started, cpu = time.perf_counter(), time.process_time()
                options = RunOptions(state_dir=state, mode="realtime", config_path=config_path)
                summary = asyncio.run(run(input_path, work / "engine.json", api=api, config=config, options=options))
                engine_s.append(time.perf_counter() - started)
                engine_cpu.append(time.process_time() - cpu)
                assert summary.counts.succeeded == tasks, summary.counts

                httpx.post(f"{emulator.base_url}/_emulator/reset").raise_for_status()
                started, cpu, server = time.perf_counter(), time.process_time(), _cpu_s(server_pid)
                flow_state = asyncio.run(_flow(batch_orchestrator, input_path, work, number, config_path))
                flow_s.append(time.perf_counter() - started)
                flow_cpu.append(time.process_time() - cpu)
                flow_summary = flow_state.result()
                assert flow_summary.counts.succeeded == tasks, flow_summary.counts
                flow_run_id = flow_state.state_details.flow_run_id
                assert flow_run_id is not None
                task_runs.append(asyncio.run(_task_run_count(flow_run_id)))
                server_cpu.append(_cpu_s(server_pid) - server)  # includes recording the run's last events
    engine, flow_time = statistics.median(engine_s), statistics.median(flow_s)
    cpu_engine, cpu_flow = statistics.median(engine_cpu), statistics.median(flow_cpu)
    return {
        "tasks": tasks,
        "rounds": rounds,
        "concurrency": concurrency,
        "engine_s": round(engine, 2),
        "flow_s": round(flow_time, 2),
        "flow_vs_engine": round(flow_time / engine, 3),
        "engine_cpu_s": round(cpu_engine, 2),
        "flow_cpu_s": round(cpu_flow, 2),
        "flow_vs_engine_cpu": round(cpu_flow / cpu_engine, 3),
        "prefect_server_cpu_s": round(statistics.median(server_cpu), 2),
        "task_runs_per_flow_run": max(task_runs),
        "engine_runs_s": " / ".join(f"{s:.1f}" for s in engine_s),
        "flow_runs_s": " / ".join(f"{s:.1f}" for s in flow_s),
    }


async def _flow(flow: Any, input_path: Path, work: Path, number: int, config_path: Path) -> Any:
    return await flow(
        input_path=str(input_path),
        output_path=str(work / "flow.json"),
        config_path=str(config_path),
        state_dir=str(work / f"flow-{number}"),
        mode="realtime",
        return_state=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table plus a JSON line."""
    parser = argparse.ArgumentParser(prog="python -m batch_engine.bench.prefect_flow", description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="engine and flow runs each, alternating")
    parser.add_argument("--concurrency", type=int, default=64, help="realtime requests in flight")
    args = parser.parse_args(argv)
    print_result(bench_prefect(args.tasks, args.rounds, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())

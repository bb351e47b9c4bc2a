"""The pipeline benchmarks of `python -m batch_engine.bench` (they print numbers; they are not tests):

- `plan`: load + plan + build the batch request bodies + store results + merge and write the output, phase by
  phase, with CPU per task and peak RSS against the input file's size;
- `batch`: N tasks through the batch lane against an emulator (own process) whose batches end at once;
- `cost`: the sample nightly workload against the emulator: billed cost against the all-realtime, no-cache
  baseline.

Peak RSS is per phase: the kernel's high-water mark (VmHWM) is reset at the start of each phase
(`/proc/self/clear_refs`), so a phase's growth is its own, not what an earlier phase left behind.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from batch_engine.bench.engine import REPLY_TOKENS, _emulator_stats, _write_tasks, print_table
from batch_engine.client import ApiSettings, BatchBody
from batch_engine.config import Config, load_config
from batch_engine.emulator import emulator_process
from batch_engine.planning import Plan, PlannedTask
from batch_engine.planning.identity import run_identity
from batch_engine.planning.outcome import FinishedRow, succeeded
from batch_engine.planning.rows import RowEncoder
from batch_engine.runner import Run, RunOptions, run

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
_REPLY = "The checkout failure is caused by a timeout in the payment callback; retry with idempotency keys."


def _status_mib(pid: int | str = "self") -> dict[str, float]:
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def _reset_peak() -> None:
    # Writing 5 resets this process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0).
    Path("/proc/self/clear_refs").write_text("5")


@dataclass
class _Phase:
    name: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_start_mib: float = 0.0
    peak_mib: float = 0.0

    def row(self, tasks: int) -> dict[str, Any]:
        return {
            "tasks": tasks,
            "phase": self.name,
            "wall_s": round(self.wall_s, 2),
            "cpu_ms_per_task": round(self.cpu_s * 1000 / tasks, 4),
            "rss_at_start_mib": round(self.rss_start_mib, 1),
            "peak_rss_mib": round(self.peak_mib, 1),
            "growth_mib": round(self.peak_mib - self.rss_start_mib, 1),
        }


@contextmanager
def _phase(phases: list[_Phase], name: str) -> Iterator[None]:
    _reset_peak()
    phase = _Phase(name, rss_start_mib=_status_mib()["VmRSS"])
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    phase.wall_s, phase.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    phase.peak_mib = _status_mib()["VmHWM"]
    phases.append(phase)


def _synthetic_result(task: PlannedTask, config: Config) -> FinishedRow:
    """What the batch lane records for a succeeded row (same constructor, a fixed reply)."""
    message = {
        "model": task.model,
        "content": [{"type": "text", "text": _REPLY}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": task.estimated_input_tokens, "output_tokens": 24},
    }
    return succeeded(task, message, "batch", 1, config, batch_id="msgbatch_bench")


def _rows(plan: Plan, encoder: RowEncoder, positions: tuple[int, ...]) -> Iterator[bytes]:
    return (encoder.row(plan.tasks[pos]) for pos in positions)


def bench_plan_one(tasks: int, config_path: Path | None) -> dict[str, Any]:
    """All offline phases of a run for `tasks` generated tasks, in this process."""
    config = load_config(config_path)
    # A run starts importing the SDK in a background thread at the plan's first batch task (`preload_sdk`, for the
    # batch lane's calls); this process's CPU clock would count that import in whichever phase it overlapped. It
    # is not the work of any phase here: imported before the clock starts.
    importlib.import_module("anthropic")
    phases: list[_Phase] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "tasks.jsonl"
        _write_tasks(path, tasks)
        input_mib = path.stat().st_size / 2**20
        baseline_mib = _status_mib()["VmRSS"]
        options = RunOptions(state_dir=work / "state")
        with _phase(phases, "load + plan"):
            prepared = Run.prepare(path, work / "out.json", config, options)  # the plan, as a run makes it
        plan = prepared.plan
        # The run identity's share of "load + plan" (every task's rendered request hashed), timed once more alone.
        identity_cpu = time.process_time()
        run_identity("bench", plan)
        identity_cpu = time.process_time() - identity_cpu
        with _phase(phases, "batch request bodies"):
            # The body `BatchLane._create_once` streams to `batches.create`, one batch at a time: measured for its
            # Content-Length, then produced again block by block as the upload reads it.
            body_bytes = 0
            encoder = RowEncoder()
            for chunk in plan.chunks:
                body = BatchBody(functools.partial(_rows, plan, encoder, chunk.task_positions))
                body_bytes += len(body)
                for _ in body.blocks():
                    pass
        ledger = prepared.ledger
        try:
            with _phase(phases, "store results (ledger)"):
                results = (_synthetic_result(task, config) for task in plan.tasks)
                while block := list(islice(results, 1000)):  # the batch lane's flush size
                    ledger.save_results(prepared.key, block, time.time())
            sizes: dict[str, float] = {}
            for output_format in ("json", "jsonl"):
                prepared.options = replace(options, output_format=output_format)
                prepared.output_path = work / f"out.{output_format}"
                with _phase(phases, f"merge + write {output_format}"):
                    prepared.finish()
                sizes[output_format] = prepared.output_path.stat().st_size / 2**20
        finally:
            prepared.close()
    total_cpu = sum(phase.cpu_s for phase in phases)
    peak = max(phase.peak_mib for phase in phases)
    jsonl = phases[-1]
    return {
        "bench": "plan",
        "tasks": tasks,
        "input_mib": round(input_mib, 1),
        "batches": len(plan.chunks),
        "batch_bodies_mib": round(body_bytes / 2**20, 1),
        "output_json_mib": round(sizes["json"], 1),
        "wall_s": round(sum(phase.wall_s for phase in phases), 2),
        "cpu_ms_per_task": round(total_cpu * 1000 / tasks, 4),
        "identity_us_per_task": round(identity_cpu * 1e6 / tasks, 2),
        "baseline_rss_mib": round(baseline_mib, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_rss_vs_input": round(peak / input_mib, 2),
        "peak_above_baseline_vs_input": round((peak - baseline_mib) / input_mib, 2),
        "jsonl_write_growth_mib": round(jsonl.peak_mib - jsonl.rss_start_mib, 1),
        "phases": [phase.row(tasks) for phase in phases],
    }


def bench_plan(sizes: list[int], config_path: Path | None) -> list[dict[str, Any]]:
    """One size in this process; several sizes each in a fresh process (peak RSS must not carry over)."""
    if len(sizes) == 1:
        return [bench_plan_one(sizes[0], config_path)]
    results = []
    for size in sizes:
        command = [sys.executable, "-m", "batch_engine.bench", "plan", "--tasks", str(size), "--json-only"]
        if config_path is not None:
            command += ["--config", str(config_path)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(orjson.loads(out.strip().splitlines()[-1]))
    return results


def print_plan(results: list[dict[str, Any]]) -> None:
    summary_keys = [key for key in results[0] if key not in ("bench", "phases")]
    print_table([{key: result[key] for key in summary_keys} for result in results])
    print()
    print_table([row for result in results for row in result["phases"]])
    print(orjson.dumps({"bench": "plan", "sizes": results}).decode())


# --- batch: the batch lane end to end against the emulator -----------------------------------------------------


def bench_batch(tasks: int, poll_s: float, state_url: str | None = None) -> dict[str, Any]:
    """`tasks` tasks forced onto the batch lane; the emulator (own process) ends every batch at once. The ledger
    and usage log are at `state_url` (default: SQLite files in a temporary state directory)."""
    with tempfile.TemporaryDirectory() as tmp, emulator_process(*REPLY_TOKENS, "--batch-duration", "0") as emulator:
        base_url, pid = emulator.base_url, emulator.pid
        work = Path(tmp)
        path = work / "tasks.jsonl"
        _write_tasks(path, tasks)
        api = ApiSettings(SecretStr("bench"), base_url)
        options = RunOptions(
            state_dir=work / "state", mode="batch", poll_interval_s=poll_s, output_format="jsonl", state_url=state_url
        )
        _reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        summary = asyncio.run(run(path, work / "out.jsonl", api=api, config=load_config(), options=options))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = _status_mib()["VmHWM"]
        calls = {
            endpoint: sum(by_status.values()) for endpoint, by_status in _emulator_stats(base_url)["calls"].items()
        }
        emulator_peak = _status_mib(pid)["VmHWM"]
        input_mib = path.stat().st_size / 2**20
    return {
        "bench": "batch",
        "tasks": tasks,
        "succeeded": summary.counts.succeeded,
        "batches": len(summary.batches),
        "input_mib": round(input_mib, 1),
        "wall_s": round(wall, 2),
        "cpu_ms_per_task": round(cpu * 1000 / tasks, 4),
        "peak_rss_mib": round(peak, 1),
        "emulator_peak_rss_mib": round(emulator_peak, 1),
        "poll_interval_s": poll_s,
        "batch_creates": calls.get("POST /v1/messages/batches", 0),
        # Includes the one retrieve the SDK makes before each results download.
        "batch_retrieves": calls.get("GET /v1/messages/batches/{id}", 0),
        "results_downloads": calls.get("GET /v1/messages/batches/{id}/results", 0),
    }


# --- cost: the sample nightly workload ------------------------------------------------------------------------


def bench_cost(tasks_path: Path, config_path: Path, poll_s: float) -> dict[str, Any]:
    """The sample workload with its own config, routed as configured: billed vs all-realtime no-cache cost."""
    emulator = ("--batch-duration", "0", "--config", str(config_path))
    with tempfile.TemporaryDirectory() as tmp, emulator_process(*REPLY_TOKENS, *emulator) as running:
        base_url = running.base_url
        work = Path(tmp)
        api = ApiSettings(SecretStr("bench"), base_url)
        options = RunOptions(state_dir=work / "state", poll_interval_s=poll_s, config_path=config_path)
        started = time.perf_counter()
        summary = asyncio.run(
            run(tasks_path, work / "out.json", api=api, config=load_config(config_path), options=options)
        )
        wall = time.perf_counter() - started
    cost = summary.cost
    return {
        "bench": "cost",
        "tasks": summary.counts.total,
        "succeeded": summary.counts.succeeded,
        "by_route": " ".join(f"{route}={count}" for route, count in summary.counts.by_route.items()),
        "billed_usd": cost.total_usd,
        "baseline_usd": cost.baseline_usd,
        "savings_usd": cost.savings_usd,
        "savings_pct": cost.savings_pct,
        "cache_hit_rate": summary.cache_hit_rate,
        "wall_s": round(wall, 2),
    }

"""Benchmarks that print numbers: `python -m batch_engine.bench plan --tasks 100000`."""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

from batch_engine.config import load_config
from batch_engine.io import iter_records
from batch_engine.planning import make_plan
from batch_engine.planning.chunking import row_bytes

_TYPES = [
    ("analyze_logs", {"service": "ingest", "logs": "WARN latency 900ms\n" * 8}),
    ("classify_bulk", {"text": "The checkout page fails after payment."}),
    ("summarize", {"document": "A postmortem timeline entry. " * 20}),
    ("chat", {"message": "Why are retries failing?"}),
    ("user_query", {"question": "Where are the daily aggregates?"}),
]


def _write_tasks(path: Path, count: int) -> None:
    with path.open("wb") as handle:
        for i in range(count):
            task_type, data = _TYPES[i % len(_TYPES)]
            handle.write(orjson.dumps({"task_id": f"t{i}", "task_type": task_type, "input_data": data}) + b"\n")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_plan(tasks: int, config_path: Path | None) -> dict[str, float]:
    """Generate `tasks` tasks, then load + plan + size every batch payload; time, CPU/task, peak RSS."""
    config = load_config(config_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.jsonl"
        _write_tasks(path, tasks)
        size_mib = path.stat().st_size / 2**20
        wall, cpu = time.perf_counter(), time.process_time()
        plan = make_plan(iter_records(path), config, datetime.now(UTC))
        payload = sum(row_bytes(plan.tasks[pos]) for chunk in plan.chunks for pos in chunk.task_positions)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "tasks": tasks,
        "input_mib": round(size_mib, 1),
        "batches": len(plan.chunks),
        "batch_payload_mib": round(payload / 2**20, 1),
        "wall_s": round(wall, 2),
        "cpu_ms_per_task": round(cpu * 1000 / tasks, 4),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }


def _print(result: dict[str, float]) -> None:
    keys = list(result)
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    print("| " + " | ".join(str(result[k]) for k in keys) + " |")
    print(orjson.dumps(result).decode())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark and print a Markdown table plus a JSON line."""
    parser = argparse.ArgumentParser(prog="python -m batch_engine.bench")
    sub = parser.add_subparsers(dest="name", required=True)
    plan = sub.add_parser("plan", help="load + plan + size batch payloads for N generated tasks")
    plan.add_argument("--tasks", type=int, default=100_000)
    plan.add_argument("--config", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.name == "plan":
        _print(bench_plan(args.tasks, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

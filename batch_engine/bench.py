"""Benchmarks that print numbers (they are not tests), each a Markdown table and one JSON line:

    python -m batch_engine.bench plan --tasks 10000,100000,1000000
    python -m batch_engine.bench batch --tasks 100000
    python -m batch_engine.bench cost
    python -m batch_engine.bench realtime --requests 2000 --concurrency 32
    python -m batch_engine.bench ratelimit --requests 1000 --rpm 600
    python -m batch_engine.bench prefect --tasks 10000

Every benchmark that talks to the API serves the emulator from its own process (`batch-engine emulator`), so
it does not share a core's worth of GIL with the client being measured. `plan`, `batch` and `cost` live in
`batch_engine.bench_pipeline`; `prefect` is `flows.bench`, imported only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from batch_engine.client import ApiSettings, make_client
from batch_engine.config import load_config
from batch_engine.io import iter_records
from batch_engine.lanes import Progress
from batch_engine.models import TaskResult
from batch_engine.planning import make_plan
from batch_engine.runner import RunOptions, run

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


# --- realtime: the engine against a bare SDK loop --------------------------------------------------------------


@contextmanager
def _emulator_process(*options: str) -> Iterator[tuple[str, int]]:
    """`batch-engine emulator` in a process (and session) of its own: its base URL and PID; stopped by PID."""
    command = [sys.executable, "-m", "batch_engine.cli", "emulator", "--port", "0", "--reply-tokens", "32", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout is not None
        found = re.search(r"http://[\d.]+:\d+", process.stdout.readline())
        if not found:
            raise RuntimeError("the emulator did not start")
        yield found.group(0), process.pid
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _emulator_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/_emulator/stats", timeout=30) as response:
        stats: dict[str, Any] = orjson.loads(response.read())
    return stats


def _write_realtime_tasks(path: Path, count: int, tag: str) -> None:
    """Distinct realtime tasks (distinct prompts: the emulator answers each one for real)."""
    rows = (
        {"task_id": f"{tag}{i}", "task_type": "user_query", "input_data": {"question": f"Where is table {tag}{i}?"}}
        for i in range(count)
    )
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))


@dataclass
class _Measured:
    requests: int
    seconds: float
    cpu_s: float
    errors: int
    latencies_s: list[float] = field(default_factory=list)

    def row(self, client: str, concurrency: int, server_cpu_s: float) -> dict[str, Any]:
        latencies = sorted(self.latencies_s)
        return {
            "client": client,
            "requests": self.requests,
            "concurrency": concurrency,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.requests / self.seconds, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
            "client_cpu_ms_per_request": round(self.cpu_s / self.requests * 1000, 3),
            "server_cpu_ms_per_request": round(server_cpu_s / self.requests * 1000, 3),
            "errors": self.errors,
        }


async def _bare(base_url: str, params: list[dict[str, Any]], concurrency: int) -> _Measured:
    """What the engine is measured against: AsyncAnthropic(max_retries=0), a semaphore, one gather."""
    client = make_client(ApiSettings(SecretStr("bench"), base_url))
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one(request: dict[str, Any]) -> None:
        nonlocal errors
        async with semaphore:
            started = time.perf_counter()
            try:
                await client.messages.create(**request)
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - started)

    try:
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(request) for request in params))
        return _Measured(len(params), time.perf_counter() - wall, time.process_time() - cpu, errors, latencies)
    finally:
        await client.close()


class _Timestamps(Progress):
    """Progress that notes when each row finished, for the sustained rate."""

    def __init__(self) -> None:
        super().__init__()
        self.finished_at: list[float] = []

    def add(self, result: TaskResult) -> None:
        super().add(result)
        self.finished_at.append(time.monotonic())


def _engine(base_url: str, tasks: Path, state: Path, concurrency: int, progress: Progress | None = None) -> _Measured:
    """`batch_engine.runner.run` with --realtime-only semantics: plan, ledger, lane, output file included."""
    api = ApiSettings(SecretStr("bench"), base_url)
    options = RunOptions(state_dir=state, mode="realtime", concurrency=concurrency)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = asyncio.run(
        run(tasks, state / "out.json", api=api, config=load_config(), options=options, progress=progress)
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return _Measured(summary.counts["total"], wall, cpu, summary.counts["failed"])


def bench_realtime(requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    """The same realtime work through a bare SDK loop and through the engine, on one emulator process,
    alternating for `rounds` rounds; each client's median round is reported (a shared machine is noisy)."""
    config = load_config()
    bare: list[dict[str, Any]] = []
    engine: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, _emulator_process() as (base_url, pid):
        warm = Path(tmp) / "warm.jsonl"
        _write_realtime_tasks(warm, concurrency, "w")
        warm_params = [task.params for task in make_plan(iter_records(warm), config, datetime.now(UTC)).tasks]
        asyncio.run(_bare(base_url, warm_params, concurrency))  # connections, first-call code paths
        for round_ in range(rounds):
            # Fresh prompts and a fresh ledger every round: nothing is answered from a previous one.
            bare_tasks, engine_tasks = Path(tmp) / f"bare{round_}.jsonl", Path(tmp) / f"engine{round_}.jsonl"
            _write_realtime_tasks(bare_tasks, requests, f"b{round_}-")
            _write_realtime_tasks(engine_tasks, requests, f"e{round_}-")
            plan = make_plan(iter_records(bare_tasks), config, datetime.now(UTC), route="realtime")
            server = _cpu_s(pid)
            measured = asyncio.run(_bare(base_url, [task.params for task in plan.tasks], concurrency))
            bare.append(measured.row("bare SDK + semaphore", concurrency, _cpu_s(pid) - server))
            server = _cpu_s(pid)
            measured = _engine(base_url, engine_tasks, Path(tmp) / f"state{round_}", concurrency)
            engine.append(measured.row("engine", concurrency, _cpu_s(pid) - server))
    rows = [_median_round(bare), _median_round(engine)]
    return {
        "bench": "realtime",
        "rounds": rounds,
        "rows": rows,
        "engine_vs_bare": round(rows[1]["requests_per_s"] / rows[0]["requests_per_s"], 3),
        "engine_vs_bare_by_round": [
            round(e["requests_per_s"] / b["requests_per_s"], 3) for b, e in zip(bare, engine, strict=True)
        ],
        "cpus": os.cpu_count(),
    }


def _median_round(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(rows, key=lambda row: float(row["requests_per_s"]))[len(rows) // 2]


def bench_ratelimit(requests: int, rpm: int, concurrency: int) -> dict[str, Any]:
    """The engine's realtime lane against an emulator enforcing `rpm`: 429 share and sustained rate."""
    with tempfile.TemporaryDirectory() as tmp, _emulator_process("--rpm", str(rpm)) as (base_url, _):
        tasks = Path(tmp) / "tasks.jsonl"
        _write_realtime_tasks(tasks, requests, "r")
        progress = _Timestamps()
        started = time.monotonic()
        measured = _engine(base_url, tasks, Path(tmp) / "state", concurrency, progress)
        calls = _emulator_stats(base_url)["calls"].get("POST /v1/messages", {})
    sent = sum(calls.values())
    finished = sorted(progress.finished_at)
    # The burst: the server's full bucket, plus what it refills while the burst is answered.
    burst = min(requests - 2, rpm + rpm // 12)
    sustained = (requests - burst) / (finished[-1] - finished[burst - 1]) * 60
    return {
        "bench": "ratelimit",
        "requests": requests,
        "server_rpm": rpm,
        "concurrency": concurrency,
        "seconds": round(measured.seconds, 1),
        "sent": sent,
        "got_429": calls.get("429", 0),
        "pct_429": round(100 * calls.get("429", 0) / sent, 2),
        "sustained_rpm": round(sustained),
        "sustained_pct_of_rpm": round(100 * sustained / rpm, 1),
        # Of everything the server would have admitted in that time (full bucket + refill), the share used.
        "utilisation_pct": round(100 * requests / (rpm + rpm * (finished[-1] - started) / 60), 1),
        "errors": measured.errors,
    }


def _print_realtime(result: dict[str, Any]) -> None:
    rows = result["rows"]
    keys = [key for key in rows[0] if key != "concurrency"]
    print(f"concurrency {rows[0]['concurrency']}, {result['cpus']} CPUs, median of {result['rounds']} rounds")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join("n/a" if row[key] is None else str(row[key]) for key in keys) + " |")
    print(f"engine / bare throughput: {result['engine_vs_bare']} (by round: {result['engine_vs_bare_by_round']})")
    print(orjson.dumps(result).decode())


def _print(result: dict[str, Any]) -> None:
    keys = list(result)
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    print("| " + " | ".join(str(result[k]) for k in keys) + " |")
    print(orjson.dumps(result).decode())


def _sizes(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark and print a Markdown table plus a JSON line."""
    parser = argparse.ArgumentParser(prog="python -m batch_engine.bench")
    sub = parser.add_subparsers(dest="name", required=True)
    plan = sub.add_parser("plan", help="load, plan, build batch bodies, store results, merge and write the output")
    plan.add_argument("--tasks", type=_sizes, default=[100_000], help="one size or several: 10000,100000")
    plan.add_argument("--config", type=Path, default=None)
    plan.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    batch = sub.add_parser("batch", help="N tasks through the batch lane; the emulator ends batches at once")
    batch.add_argument("--tasks", type=int, default=100_000)
    batch.add_argument("--poll-interval", type=float, default=0.2, help="seconds between batch polls (max)")
    cost = sub.add_parser("cost", help="the sample nightly workload: billed cost vs the all-realtime baseline")
    cost.add_argument("--tasks-file", type=Path, default=None, help="default: samples/nightly_tasks.json")
    cost.add_argument("--config", type=Path, default=None, help="default: samples/config.toml")
    cost.add_argument("--poll-interval", type=float, default=0.2)
    realtime = sub.add_parser("realtime", help="engine realtime lane vs a bare AsyncAnthropic + semaphore loop")
    realtime.add_argument("--requests", type=int, default=2000)
    realtime.add_argument("--concurrency", type=int, default=32)
    realtime.add_argument("--rounds", type=int, default=3, help="alternate bare/engine this many times")
    ratelimit = sub.add_parser("ratelimit", help="realtime lane against an emulator enforcing an RPM limit")
    ratelimit.add_argument("--requests", type=int, default=1000)
    ratelimit.add_argument("--rpm", type=int, default=600)
    ratelimit.add_argument("--concurrency", type=int, default=32)
    prefect = sub.add_parser("prefect", help="the Prefect flow vs the engine alone (python -m flows.bench)")
    prefect.add_argument("--tasks", type=int, default=10_000)
    prefect.add_argument("--rounds", type=int, default=3)
    prefect.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    # The engine logs each lane's progress; a benchmark prints only its figures.
    logging.getLogger("batch_engine").setLevel(logging.WARNING)
    if args.name == "prefect":
        # Prefect takes seconds to import and is an optional layer on top: only this benchmark loads it.
        from flows.bench import main as prefect_main

        return prefect_main(
            ["--tasks", str(args.tasks), "--rounds", str(args.rounds), "--concurrency", str(args.concurrency)]
        )
    if args.name in ("plan", "batch", "cost"):
        from batch_engine import bench_pipeline as pipeline

        if args.name == "plan":
            results = pipeline.bench_plan(args.tasks, args.config)
            if args.json_only:
                print(orjson.dumps(results[0]).decode())
            else:
                pipeline.print_plan(results)
        elif args.name == "batch":
            _print(pipeline.bench_batch(args.tasks, args.poll_interval))
        else:
            tasks_file = args.tasks_file or pipeline.SAMPLES / "nightly_tasks.json"
            config = args.config or pipeline.SAMPLES / "config.toml"
            _print(pipeline.bench_cost(tasks_file, config, args.poll_interval))
    elif args.name == "realtime":
        _print_realtime(bench_realtime(args.requests, args.concurrency, args.rounds))
    else:
        _print(bench_ratelimit(args.requests, args.rpm, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The state backends side by side: the same realtime run and the same batch run with the ledger and usage log
in SQLite files and in PostgreSQL, alternating, one JSON line per run and one for the comparison.

    python -m batch_engine.bench state --state-url postgresql://localhost/bench --realtime 10000 --batch 100000

Both backends see the same work (fresh prompts per run, so nothing is answered from an earlier run); the
emulator runs in a process of its own, ends batches at once and answers without latency, so the state writes are
as large a share of the wall time as they can be.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from batch_engine.bench.engine import REPLY_TOKENS, _engine, _write_realtime_tasks, print_table
from batch_engine.bench.pipeline import bench_batch
from batch_engine.emulator import emulator_process
from batch_engine.state.url import parse_state_url


def bench_state(state_url: str, realtime: int, batch: int, concurrency: int, rounds: int) -> list[dict[str, Any]]:
    """Run `rounds` rounds of (realtime run, batch run) on each backend; print and return the rows."""
    shown = parse_state_url(state_url).shown
    rows: list[dict[str, Any]] = []
    for round_ in range(rounds):
        for backend, url in (("sqlite", None), ("postgresql", state_url)):
            if realtime:
                rows.append(_realtime_row(backend, url, realtime, concurrency, round_))
                print(orjson.dumps(rows[-1]).decode(), flush=True)
            if batch:
                result = bench_batch(batch, 0.2, url)
                rows.append(
                    {"bench": "state", "lane": "batch", "backend": backend, "round": round_, "tasks": batch}
                    | {key: result[key] for key in ("wall_s", "cpu_ms_per_task")}
                )
                print(orjson.dumps(rows[-1]).decode(), flush=True)
    print_table(rows)
    summary: dict[str, Any] = {"bench": "state", "state_url": shown, "rounds": rounds, "cpus": os.cpu_count()}
    for lane in ("realtime", "batch"):
        walls = {}
        for backend in ("sqlite", "postgresql"):
            measured = [row["wall_s"] for row in rows if row["lane"] == lane and row["backend"] == backend]
            if measured:
                walls[backend] = min(measured)
        if len(walls) == 2:
            summary[f"{lane}_wall_s"] = walls
            summary[f"{lane}_postgresql_vs_sqlite"] = round(walls["postgresql"] / walls["sqlite"], 3)
    summary["load_average"] = [round(value, 2) for value in os.getloadavg()]
    print(orjson.dumps(summary).decode())
    return rows


def _realtime_row(backend: str, url: str | None, tasks: int, concurrency: int, round_: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, emulator_process(*REPLY_TOKENS) as emulator:
        path = Path(tmp) / "tasks.jsonl"
        _write_realtime_tasks(path, tasks, f"{backend}{round_}-{os.getpid()}-")
        measured = _engine(emulator.base_url, path, Path(tmp) / "state", concurrency, state_url=url)
    return {
        "bench": "state",
        "lane": "realtime",
        "backend": backend,
        "round": round_,
        "tasks": tasks,
        "wall_s": round(measured.seconds, 2),
        "cpu_ms_per_task": round(measured.cpu_s * 1000 / tasks, 4),
    }

"""`python -m batch_engine.bench.record`: CPU per row of `LaneContext.record`, the write path of both lanes (the
usage log, then the ledger), on the event loop's thread. It prints numbers; it is not a test.

- batch: N succeeded batch rows stored a page of the batch lane's flush size at a time, as `_collect_once` does;
- realtime: the same rows `--group` at a time, each with a request id and a latency, as the realtime lane's
  recorder writes what finished in one turn of the event loop.

The rows are built before the clock starts (`succeeded`, as the lanes build them), so the figures are the record
path alone: usage records, the two SQLite writes, the progress counters. Rounds alternate the two kinds, each on
a fresh state directory.

    python -m batch_engine.bench.record --tasks 100000 --group 4 --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from batch_engine.bench.engine import _write_tasks, print_table
from batch_engine.client import ApiSettings, Connection, RetryPolicy
from batch_engine.config import Config, load_config
from batch_engine.lanes import LaneContext
from batch_engine.lanes.batch import _FLUSH_ROWS
from batch_engine.lanes.sender import Sender
from batch_engine.planning import PlannedTask
from batch_engine.planning.budget import Budget, Estimator
from batch_engine.planning.outcome import FinishedRow, succeeded
from batch_engine.runner import Run, RunOptions
from batch_engine.state.usage_log import UsageLog

_REPLY = "The checkout failure is caused by a timeout in the payment callback; retry with idempotency keys."


def _answer(task: PlannedTask) -> dict[str, Any]:
    """A reply as the API sends it (the emulator's fields)."""
    return {
        "id": f"msg_{task.index}",
        "type": "message",
        "role": "assistant",
        "model": task.model,
        "content": [{"type": "text", "text": _REPLY}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": task.estimated_input_tokens,
            "output_tokens": 24,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        },
    }


def _context(run: Run, usage_log: UsageLog, config: Config) -> LaneContext:
    connection = Connection(ApiSettings(SecretStr("bench"), "http://127.0.0.1:9"))  # never called
    logger = logging.getLogger("batch_engine.bench")
    return LaneContext(
        api=connection,
        sender=Sender(connection, "inline", logger),
        config=config,
        ledger=run.ledger,
        run_key=run.key,
        tasks=run.tasks_by_index(),
        attempts={},
        policy=RetryPolicy(),
        logger=logger,
        lease_check=lambda: None,
        usage_log=usage_log,
        estimator=Estimator(config, {}, {}),
        budget=Budget.unlimited(),
    )


def _measure(path: Path, state_dir: Path, lane: str, group: int, config: Config) -> dict[str, Any]:
    run = Run.prepare(path, state_dir / "out.json", config, RunOptions(state_dir=state_dir))
    usage_log = UsageLog.open(state_dir)
    try:
        ctx = _context(run, usage_log, config)
        tasks = run.plan.tasks
        if lane == "batch":
            rows: list[FinishedRow] = [
                succeeded(t, _answer(t), "batch", 1, config, batch_id="msgbatch_bench") for t in tasks
            ]
            size = _FLUSH_ROWS
        else:
            rows = [succeeded(t, _answer(t), "realtime", 1, config) for t in tasks]
            for task in tasks:
                ctx.request_ids[task.index] = f"req_bench_{task.index:020d}"
                ctx.latencies[task.index] = 0.25
            size = group
        # Planning starts importing the SDK in a background thread (`client.preload_sdk`): done before the clock
        # starts, or its CPU lands in the rows' figure.
        assert ctx.api.sdk is not None
        ended_at = time.time()
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(rows), size):
            ctx.record(rows[start : start + size], at=ended_at if lane == "batch" else None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        usage_log.close()
        run.close()
    return {
        "bench": "record",
        "lane": lane,
        "rows": len(rows),
        "rows_per_write": size,
        "cpu_us_per_row": round(cpu * 1e6 / len(rows), 2),
        "wall_us_per_row": round(wall * 1e6 / len(rows), 2),
        "load_average": round(os.getloadavg()[0], 2),
    }


def bench_record(tasks: int, group: int, rounds: int) -> list[dict[str, Any]]:
    """`rounds` rounds of (batch pages, realtime groups) of `tasks` rows each; one row per measurement."""
    config = load_config()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="batch_engine_record_") as tmp:
        path = Path(tmp) / "tasks.jsonl"
        _write_tasks(path, tasks)
        for round_ in range(rounds):
            for lane in ("batch", "realtime"):
                results.append(_measure(path, Path(tmp) / f"{lane}{round_}", lane, group, config))
                print(orjson.dumps(results[-1]).decode(), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_engine.bench.record", description=__doc__)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=4, help="realtime rows per write (one event-loop turn's)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger("batch_engine").setLevel(logging.WARNING)
    print_table(bench_record(args.tasks, args.group, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fault soak: `python -m batch_engine.bench.soak --tasks 10000` runs the engine against an emulator in its own process
that injects 10% 429 (with retry-after), 5% 529, 3% 500 and 2% dropped connections on every endpoint, makes 5% of
batch rows error (api_error) and 2% expire, and (`--fault-after-commit`, default 2%) makes batch creates and
Messages calls do their work and then answer 500/529; then prints a Markdown table and a JSON line: tasks
accounted for, succeeded, failed, wall time, attempts per task, duplicate billed successes, batches the ledger
does not hold, the usage log against the emulator's billing, and peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from batch_engine.client import ApiSettings, RetryPolicy, list_batches, make_client
from batch_engine.config import default_config_text, parse_config
from batch_engine.emulator import EmulatorProcess, emulator_process
from batch_engine.files import atomic_write_bytes, iter_records
from batch_engine.runner import RunOptions, run
from batch_engine.state.backend import open_ledger, open_usage_log
from batch_engine.state.ledger import ChunkRecord
from batch_engine.state.url import resolve_state_url

FAULTS = {"429": 0.10, "529": 0.05, "500": 0.03, "drop": 0.02, "row_error": 0.05, "row_expire": 0.02}
START_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class SoakResult:
    """The figures a soak reports."""

    tasks: int
    accounted_for: int  # output rows, one per task, in input order
    succeeded: int
    failed: int
    by_status: dict[str, int]
    wall_s: float
    attempts_mean: float
    attempts_max: int
    batches_created: int
    duplicate_batch_successes: int  # a custom_id billed as succeeded in two batches: must be 0
    duplicate_batch_payloads: int  # the same custom_id set created twice ...
    whole_chunk_resubmissions: int  # ... of which resubmissions of every row of their parent: the rest must be 0
    realtime_rebilled: int  # a realtime answer lost to a dropped connection after billing, then sent again
    dropped_realtime_responses: int  # injected drops on POST /v1/messages (the ceiling for the line above)
    faults_injected: dict[str, int]
    batches_not_in_ledger: int  # created by the API, recorded by no chunk: must be 0
    billed_usd: float  # what the emulator billed
    unanswered_messages: int  # Messages billed whose answer never reached the engine (the realtime ceiling)
    unanswered_usd: float  # of which Messages answers that never reached the engine (dropped, error after work)
    usage_log_usd: float  # what the usage log holds: must equal billed - unanswered, to the cent
    usage_log_batch_usd: float
    billed_batch_usd: float  # batch rows billed: must equal the usage log's batch rows
    engine_peak_rss_mib: float
    emulator_peak_rss_mib: float


def _tasks(count: int, realtime_every: int) -> Iterator[bytes]:
    for i in range(count):
        if realtime_every and i % realtime_every == 0:
            task = {"task_id": f"s{i}", "task_type": "user_query", "input_data": {"question": f"Where is table {i}?"}}
        else:
            task = {"task_id": f"s{i}", "task_type": "classify_bulk", "input_data": {"text": f"Ticket {i}: it fails."}}
        yield orjson.dumps(task) + b"\n"


def _config_text(**limits: object) -> str:
    text = default_config_text()
    for key, value in limits.items():
        text, found = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
        if not found:
            raise KeyError(f"no [limits] key {key} in the shipped config")
    return text


def _emulator(batch_duration_s: float, seed: int, after_commit: float) -> AbstractContextManager[EmulatorProcess]:
    """`batch-engine emulator` in its own process, injecting FAULTS on every endpoint."""
    options = ["--fault-endpoints", "*", "--fault-after-commit", str(after_commit)]
    options += ["--batch-duration", f"{batch_duration_s}s", "--seed", str(seed), "--row-error-type", "api_error"]
    for kind, rate in FAULTS.items():
        options += ["--fault-rate", f"{kind}={rate}"]
    return emulator_process(*options, stderr=subprocess.DEVNULL, start_timeout_s=START_TIMEOUT_S)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return orjson.loads(response.read())


def _peak_rss_mib(pid: int | None = None) -> float:
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak(
    tasks: int,
    *,
    realtime_every: int = 10,
    chunk_size: int = 2000,
    batch_duration_s: float = 3.0,
    max_row_attempts: int = 5,
    seed: int = 0,
    after_commit: float = 0.02,
    state_url: str | None = None,
) -> SoakResult:
    """Run `tasks` generated tasks through the engine against a faulty emulator and measure what happened.

    The run's ledger and usage log are at `state_url` (an empty database, for PostgreSQL), else SQLite files in a
    temporary state directory."""
    with tempfile.TemporaryDirectory(prefix="batch_engine_soak_") as tmp:
        work = Path(tmp)
        input_path, output_path = work / "tasks.jsonl", work / "results.json"
        atomic_write_bytes(input_path, b"".join(_tasks(tasks, realtime_every)))
        config = parse_config(
            _config_text(
                batch_poll_initial_s=0.5,
                batch_poll_interval_s=1.0,
                max_requests_per_batch=chunk_size,
                max_row_attempts=max_row_attempts,
                # The emulator enforces no rate limit; these only keep the engine's own buckets out of the way.
                rpm=60000,
                itpm=100000000,
                otpm=100000000,
            ),
            "soak config",
        )
        with _emulator(batch_duration_s, seed, after_commit) as emulator:
            base_url = emulator.base_url
            started = time.perf_counter()
            asyncio.run(
                run(
                    input_path,
                    output_path,
                    api=ApiSettings(SecretStr("sk-soak"), base_url),
                    config=config,
                    options=RunOptions(state_dir=work / "state", state_url=state_url),
                )
            )
            wall = time.perf_counter() - started
            stats = _get_json(f"{base_url}/_emulator/stats")
            emulator_rss = _peak_rss_mib(emulator.pid)
            api_batches = asyncio.run(_batch_ids(base_url))
        state = resolve_state_url(state_url, work / "state")
        with open_ledger(state) as ledger:
            recorded = ledger.known_batch_ids()
            (record,) = ledger.runs()
            repeats = _whole_chunk_resubmissions(ledger.chunks(record.run_key))
        with open_usage_log(state) as log:
            usage = log.records()
        document = orjson.loads(output_path.read_bytes())
        rows = document["results"]
        expected = [record.value["task_id"] for record in iter_records(input_path)]
    if [row["task_id"] for row in rows] != expected:
        raise AssertionError("the output does not hold every task once, in input order")
    statuses = Counter(row["status"] for row in rows)
    attempts = [row["attempts"] for row in rows]
    dropped = stats["calls"].get("POST /v1/messages", {}).get("dropped", 0)
    return SoakResult(
        tasks=tasks,
        accounted_for=len(rows),
        succeeded=statuses["succeeded"],
        failed=len(rows) - statuses["succeeded"],
        by_status=dict(statuses),
        wall_s=round(wall, 1),
        attempts_mean=round(sum(attempts) / len(attempts), 3),
        attempts_max=max(attempts),
        batches_created=stats["batches_created"],
        duplicate_batch_successes=stats["duplicate_succeeded_custom_ids"],
        duplicate_batch_payloads=stats["duplicate_batch_payloads"],
        whole_chunk_resubmissions=repeats,
        realtime_rebilled=stats["repeated_realtime_requests"],
        dropped_realtime_responses=dropped,
        faults_injected=stats["faults_injected"],
        batches_not_in_ledger=len(api_batches - recorded),
        billed_usd=round(stats["cost_usd"]["total"], 6),
        unanswered_messages=stats["unanswered_messages"],
        unanswered_usd=round(stats["unanswered_cost_usd"], 6),
        usage_log_usd=round(sum(record.cost_usd for record in usage), 6),
        usage_log_batch_usd=round(sum(record.cost_usd for record in usage if record.route == "batch"), 6),
        billed_batch_usd=round(stats["cost_usd"]["batch"], 6),
        engine_peak_rss_mib=round(_peak_rss_mib(), 1),
        emulator_peak_rss_mib=round(emulator_rss, 1),
    )


def _whole_chunk_resubmissions(chunks: list[ChunkRecord]) -> int:
    """Resubmissions carrying exactly their parent's rows (every row of it failed again): the API sees the same
    custom_ids twice, legitimately, each batch a chunk of its own."""
    rows = {chunk.chunk_key: set(chunk.task_indexes) for chunk in chunks if chunk.batch_id}
    count = 0
    for key, indexes in rows.items():
        base, _, round_ = key.partition("~")
        if round_:
            count += rows.get(base if round_ == "1" else f"{base}~{int(round_) - 1}") == indexes
    return count


async def _batch_ids(base_url: str) -> set[str]:
    client = make_client(ApiSettings(SecretStr("sk-soak"), base_url))
    try:
        # The emulator injects faults on every endpoint, this one too: listed as the engine would list, retried.
        return {info.id for info in await RetryPolicy().call(lambda: list_batches(client, created_after=0))}
    finally:
        await client.close()


def _print(result: SoakResult) -> None:
    data = asdict(result)
    print("| figure | value |")
    print("| --- | --- |")
    for key, value in data.items():
        shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
        print(f"| {key} | {shown} |")
    print(orjson.dumps(data).decode())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one soak and print a Markdown table plus a JSON line; exit 1 if a task was lost or billed twice."""
    parser = argparse.ArgumentParser(prog="python -m batch_engine.bench.soak", description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--realtime-every", type=int, default=10, help="every Nth task is a realtime task")
    parser.add_argument("--chunk-size", type=int, default=2000, help="max requests per batch")
    parser.add_argument("--batch-duration", type=float, default=3.0, help="seconds an emulated batch takes")
    parser.add_argument(
        "--max-row-attempts",
        type=int,
        default=5,
        help="batch attempts per row (7%% of rows fail each attempt; at the shipped 3 a few in 10,000 run out)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fault-after-commit",
        type=float,
        default=0.02,
        help="share of creates and Messages answered 5xx after the work",
    )
    parser.add_argument(
        "--state-url", default=None, help="an empty database to keep the run's state in (default: SQLite files)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the engine's log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(asctime)s %(message)s")
    result = soak(
        args.tasks,
        realtime_every=args.realtime_every,
        chunk_size=args.chunk_size,
        batch_duration_s=args.batch_duration,
        max_row_attempts=args.max_row_attempts,
        seed=args.seed,
        after_commit=args.fault_after_commit,
        state_url=args.state_url,
    )
    _print(result)
    clean = result.accounted_for == result.tasks and not result.duplicate_batch_successes
    repeats = result.duplicate_batch_payloads - result.whole_chunk_resubmissions
    clean = clean and not repeats and not result.batches_not_in_ledger
    logged = abs(result.usage_log_usd - (result.billed_usd - result.unanswered_usd)) < 0.005
    return 0 if clean and logged and abs(result.usage_log_batch_usd - result.billed_batch_usd) < 0.005 else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m batch_engine.bench million`: the user's path at nightly-job scale (it prints numbers; not a test).

It generates the realistic file (N tasks of JSONL: 90 % batch task types of the samples, whose system prompts are
~5 KB, 10 % realtime), serves the emulator from its OWN process (zero latency, batches end after 20 s), runs
`batch-engine run` as a user would (a fresh process, the in-process path: no Prefect server configured), and then
checks what a user would: every input task exactly once in the output, in input order; exactly one batch create
per batch in the output; the output's cost equal to what the emulator billed. One JSON line: wall, CPU
(user + sys of the CLI process), peak RSS of the CLI process, and the phase breakdown (the run's own
`durations_s`, and when the run's log lines appeared).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from batch_engine.bench.engine import REPLY_TOKENS, _emulator_stats
from batch_engine.emulator.process import emulator_process

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
BATCH_TYPES = ("analyze_logs", "classify_bulk", "summarize", "generate_docs", "generate_tests", "generate_report")
REALTIME_TYPES = ("chat", "user_query")
# The engine's own buckets must not be what limits the run: the emulator enforces no rate limit here.
_LIMITS = {
    "rpm": 10_000_000,
    "itpm": 10_000_000_000,
    "otpm": 10_000_000_000,
    "batch_poll_initial_s": 1.0,
    "batch_poll_interval_s": 2.0,
}
# Log lines whose first appearance (and last) mark the run's phases.
_EVENTS = {
    "batch_created": re.compile(r"batch \S+ created for chunk"),
    "batch_ended": re.compile(r"batch \S+: ended"),
    "batch_lane_done": re.compile(r"batch lane: "),
    "realtime_lane_done": re.compile(r"realtime lane: "),
}
# The line a sender process's end leaves: its requests and its own CPU (part of the CLI's CPU as wait4 counts it).
_SENDER = re.compile(r"realtime sender process: (\d+) requests sent, ([\d.]+) s CPU")


def _templates() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The sample records of each kind, without the fields that would reroute them (mode, deadline)."""
    records = orjson.loads((SAMPLES / "nightly_tasks.json").read_bytes())
    plain = [r for r in records if "mode" not in r and "deadline" not in r]
    batch = [r for r in plain if r["task_type"] in BATCH_TYPES]
    realtime = [r for r in plain if r["task_type"] in REALTIME_TYPES]
    return batch, realtime


def write_tasks(path: Path, count: int, realtime_every: int = 10) -> tuple[int, int]:
    """`count` tasks `t0`, `t1`, ..., one in `realtime_every` realtime, written a block at a time: (batch,
    realtime) counts."""
    batch, realtime = _templates()
    kinds = [0, 0]
    with path.open("wb") as handle:
        block: list[bytes] = []
        for i in range(count):
            is_realtime = i % realtime_every == realtime_every - 1
            pool = realtime if is_realtime else batch
            template = pool[i % len(pool)]
            kinds[is_realtime] += 1
            record = {
                "task_id": f"t{i}",
                "task_type": template["task_type"],
                "input_data": template["input_data"],
                "metadata": {"source": "nightly", "seq": i},
            }
            block.append(orjson.dumps(record))
            if len(block) == 10_000:
                handle.write(b"\n".join(block) + b"\n")
                block = []
        if block:
            handle.write(b"\n".join(block) + b"\n")
    return kinds[0], kinds[1]


def write_config(path: Path, sender: str = "auto") -> None:
    """The samples' config with the limits above (the samples' 1,000 RPM would make it a rate-limit test), and
    where the realtime lane's requests are sent from (`realtime_sender`)."""
    text = (SAMPLES / "config.toml").read_text()
    for key, value in {**_LIMITS, "realtime_sender": f'"{sender}"'}.items():
        text, found = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
        if not found:
            raise KeyError(f"no [limits] key {key} in samples/config.toml")
    path.write_text(text)


def _output_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The run line, then the rows of a JSONL output file, one at a time (the bench's own memory stays flat)."""
    with path.open("rb") as handle:
        for line in handle:
            yield orjson.loads(line)


def _read_events(
    stream: Any, started: float, events: dict[str, list[float]], tail: list[str], sender: dict[str, float]
) -> None:
    for line in stream:
        at = time.perf_counter() - started
        if found := _SENDER.search(line):
            sender["requests"], sender["cpu_s"] = int(found[1]), float(found[2])
        for name, pattern in _EVENTS.items():
            if pattern.search(line):
                events.setdefault(name, []).append(at)
        tail.append(line.rstrip())
        del tail[:-20]


def bench_million(
    tasks: int, batch_duration_s: float = 20.0, keep: Path | None = None, sender: str = "auto"
) -> dict[str, Any]:
    """Generate, run the CLI end to end against an emulator in its own process, check, measure. `sender`: the
    config's `realtime_sender` (auto, inline or process)."""
    with tempfile.TemporaryDirectory(prefix="batch_engine_million_") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        input_path, output_path, config_path = work / "tasks.jsonl", work / "out.jsonl", work / "config.toml"
        batch_count, realtime_count = write_tasks(input_path, tasks)
        write_config(config_path, sender)
        with emulator_process(*REPLY_TOKENS, "--batch-duration", f"{batch_duration_s}s") as emulator:
            base_url, emulator_pid = emulator.base_url, emulator.pid
            env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_URL")}
            env |= {"ANTHROPIC_API_KEY": "sk-bench", "ANTHROPIC_BASE_URL": base_url}
            command = [sys.executable, "-m", "batch_engine.cli", "run", str(input_path), "-o", str(output_path)]
            command += ["--config", str(config_path), "--state-dir", str(work / "state"), "--format", "jsonl"]
            events: dict[str, list[float]] = {}
            tail: list[str] = []
            sender_usage: dict[str, float] = {}
            started = time.perf_counter()
            process = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1
            )
            reading = (process.stderr, started, events, tail, sender_usage)
            reader = threading.Thread(target=_read_events, args=reading, daemon=True)
            reader.start()
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(status)
            reader.join(timeout=10)
            if process.returncode != 0:
                raise RuntimeError(f"batch-engine run exited {process.returncode}:\n" + "\n".join(tail))
            stats = _emulator_stats(base_url)
            emulator_cpu = _cpu_s(emulator_pid)
            emulator_peak = _peak_mib(emulator_pid)
        rows = _output_rows(output_path)
        run = next(rows)["run"]
        checked = 0
        for i, row in enumerate(rows):
            if row["task_id"] != f"t{i}":
                raise AssertionError(f"output row {i} is {row['task_id']}, expected t{i} (every task once, in order)")
            if row["status"] != "succeeded":
                raise AssertionError(f"task t{i} ended {row['status']}")
            checked += 1
        if checked != tasks:
            raise AssertionError(f"{checked} output rows for {tasks} tasks")
        creates = sum(stats["calls"].get("POST /v1/messages/batches", {}).values())
        if creates != len(run["batches"]) or stats["duplicate_custom_ids_across_batches"]:
            raise AssertionError(f"{creates} batch creates for {len(run['batches'])} batches in the output")
        billed = stats["cost_usd"]["total"]
        if abs(run["cost"]["total_usd"] - billed) > 1e-6:
            raise AssertionError(f"output cost ${run['cost']['total_usd']} != emulator bill ${billed}")
        input_mib = input_path.stat().st_size / 2**20
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "bench": "million",
        "tasks": tasks,
        "batch_tasks": batch_count,
        "realtime_tasks": realtime_count,
        "input_mib": round(input_mib, 1),
        "batches": len(run["batches"]),
        "batch_creates": creates,
        "every_task_once_in_order": True,
        "cost_usd": round(run["cost"]["total_usd"], 4),
        "emulator_billed_usd": round(billed, 4),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cpu_user_s": round(usage.ru_utime, 1),
        "cpu_sys_s": round(usage.ru_stime, 1),
        # wait4 counts the sender process's CPU in the CLI's; its own figure, when there was one, and the rest.
        "realtime_sender": sender,
        "sender_process_requests": sender_usage.get("requests"),
        "sender_process_cpu_s": sender_usage.get("cpu_s"),
        "cpu_without_sender_s": round(cpu - sender_usage.get("cpu_s", 0.0), 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "durations_s": run["durations_s"],
        "durations_sum_s": round(sum(v for k, v in run["durations_s"].items() if k != "total"), 1),
        "log_events_s": {
            name: [round(times[0], 1), round(times[-1], 1)] if len(times) > 1 else [round(times[0], 1)]
            for name, times in events.items()
        },
        "emulator_cpu_s": round(emulator_cpu, 1),
        "emulator_peak_rss_mib": round(emulator_peak, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0

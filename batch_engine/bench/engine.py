"""Benchmarks that print numbers (they are not tests), each a Markdown table and one JSON line:

    python -m batch_engine.bench plan --tasks 10000,100000,1000000
    python -m batch_engine.bench batch --tasks 100000
    python -m batch_engine.bench cost
    python -m batch_engine.bench realtime --requests 2000 --concurrency 32
    python -m batch_engine.bench realtime --requests 2000 --concurrency 32 --latency 100ms
    python -m batch_engine.bench ratelimit --requests 1000 --rpm 600
    python -m batch_engine.bench ratelimit --requests 600 --rpm 1200 --itpm 300000 --pad-tokens 1000
    python -m batch_engine.bench faults --requests 1000 --latency 100ms --fault-rate 0.1
    python -m batch_engine.bench faults --requests 1000 --latency 100ms --fault-rate 0.1 --rpm 600
    python -m batch_engine.bench faults --requests 1000 --latency 100ms --fault-rate 0.1 --curator-python PY
    python -m batch_engine.bench prefect --tasks 10000
    python -m batch_engine.bench validate --rows 100000
    python -m batch_engine.bench million --tasks 1000000
    python -m batch_engine.bench emulator-cpu --tasks 20000 --rounds 3
    python -m batch_engine.bench startup --requests 1000 --latency 250ms
    python -m batch_engine.bench state --state-url postgresql://localhost/bench --realtime 10000 --batch 100000

Every benchmark that talks to the API serves the emulator from its own process (`batch-engine emulator`), so
it does not share a core's worth of GIL with the client being measured. `plan`, `batch` and `cost` live in
`batch_engine.bench.pipeline`; `prefect` is `batch_engine.bench.prefect_flow`, imported only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from batch_engine.cli.args import duration as _duration
from batch_engine.client import ApiSettings, make_client
from batch_engine.config import Config, load_config
from batch_engine.emulator import emulator_process
from batch_engine.files import iter_records
from batch_engine.lanes import Progress
from batch_engine.planning import make_plan
from batch_engine.runner import RunOptions, run
from batch_engine.state.backend import open_usage_log
from batch_engine.state.url import resolve_state_url

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

# Short fixed replies: the benchmarks measure the client, not the size of what comes back.
REPLY_TOKENS = ("--reply-tokens", "32")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _emulator_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/_emulator/stats", timeout=30) as response:
        stats: dict[str, Any] = orjson.loads(response.read())
    return stats


def _write_realtime_tasks(path: Path, count: int, tag: str, pad_tokens: int = 0) -> None:
    """Distinct realtime tasks (distinct prompts: the emulator answers each one for real), each question padded
    with `pad_tokens` tokens of filler (the emulator counts a token per 4 bytes)."""
    padding = " pad" * pad_tokens
    questions = (f"Where is table {tag}{i}?{padding}" for i in range(count))
    rows = (
        {"task_id": f"{tag}{i}", "task_type": "user_query", "input_data": {"question": question}}
        for i, question in enumerate(questions)
    )
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))


@dataclass
class _Measured:
    requests: int
    seconds: float
    cpu_s: float
    errors: int
    latencies_s: list[float] = field(default_factory=list)
    # Of each success: when it finished (on a clock of the client's own) and the input tokens ITPM counts.
    finished: list[tuple[float, int]] = field(default_factory=list)

    def row(self, client: str, concurrency: int, server_cpu_s: float, limit_per_s: float | None) -> dict[str, Any]:
        latencies = sorted(self.latencies_s)
        requests_per_s = self.requests / self.seconds
        return {
            "client": client,
            "requests": self.requests,
            "concurrency": concurrency,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(requests_per_s, 1),
            "of_physical_limit": round(requests_per_s / limit_per_s, 3) if limit_per_s else None,
            "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
            "client_cpu_ms_per_request": round(self.cpu_s / self.requests * 1000, 3),
            "server_cpu_ms_per_request": round(server_cpu_s / self.requests * 1000, 3),
            "errors": self.errors,
        }


async def _bare(base_url: str, params: list[dict[str, Any]], concurrency: int, *, max_retries: int = 0) -> _Measured:
    """What the engine is measured against: AsyncAnthropic (SDK retries off unless asked), a semaphore, one
    gather."""
    client = make_client(ApiSettings(SecretStr("bench"), base_url), max_retries=max_retries)
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    finished: list[tuple[float, int]] = []
    errors = 0

    async def one(request: dict[str, Any]) -> None:
        nonlocal errors
        async with semaphore:
            started = time.perf_counter()
            try:
                usage = (await client.messages.create(**request)).usage
            except Exception:
                errors += 1
                usage = None
            ended = time.perf_counter()
            latencies.append(ended - started)
            if usage is not None:
                finished.append((ended, usage.input_tokens + (usage.cache_creation_input_tokens or 0)))

    try:
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(request) for request in params))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return _Measured(len(params), wall, cpu, errors, latencies, finished)
    finally:
        await client.close()


@dataclass
class _TaskTimes(Progress):
    """Progress that keeps each realtime task's time from its first request to its answer, retries included."""

    task_seconds: list[float] = field(default_factory=list)

    def realtime_answered(self, seconds: float) -> None:
        self.task_seconds.append(seconds)


def _engine(
    base_url: str,
    tasks: Path,
    state: Path,
    concurrency: int,
    config: Config | None = None,
    *,
    task_latency: bool = False,
    state_url: str | None = None,
) -> _Measured:
    """`batch_engine.runner.run` with --realtime-only semantics: plan, ledger, lane, output file included.
    Latencies (of each billed request; with `task_latency`, of each task, retries included) and finish times are
    read afterwards, outside the measured span."""
    api = ApiSettings(SecretStr("bench"), base_url)
    options = RunOptions(state_dir=state, mode="realtime", concurrency=concurrency, state_url=state_url)
    progress = _TaskTimes()
    wall, cpu = time.perf_counter(), time.process_time()
    summary = asyncio.run(
        run(tasks, state / "out.json", api=api, config=config or load_config(), options=options, progress=progress)
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    with open_usage_log(resolve_state_url(state_url, state)) as usage_log:
        records = usage_log.records(run_key=summary.run_key)
    latencies = [record.latency_s for record in records if record.latency_s is not None]
    finished = [(record.at, record.input_tokens + record.cache_write_tokens) for record in records]
    if task_latency:
        latencies = progress.task_seconds
    return _Measured(summary.counts.total, wall, cpu, summary.counts.failed, latencies, finished)


def bench_realtime(
    requests: int, concurrency: int, rounds: int, latency_s: float = 0.0, jitter_s: float = 0.0
) -> dict[str, Any]:
    """The same realtime work through a bare SDK loop and through the engine, on one emulator process,
    alternating for `rounds` rounds; each client's median round is reported (a shared machine is noisy)."""
    config = load_config()
    # No client can beat `concurrency` requests each waiting the emulator's mean latency (jitter is 0..J).
    mean_latency_s = latency_s + jitter_s / 2
    limit_per_s = concurrency / mean_latency_s if mean_latency_s else None
    bare: list[dict[str, Any]] = []
    engine: list[dict[str, Any]] = []
    emulator = emulator_process(*REPLY_TOKENS, "--latency", str(latency_s), "--jitter", str(jitter_s))
    with tempfile.TemporaryDirectory() as tmp, emulator as running:
        base_url, pid = running.base_url, running.pid
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
            bare.append(measured.row("bare SDK + semaphore", concurrency, _cpu_s(pid) - server, limit_per_s))
            server = _cpu_s(pid)
            measured = _engine(base_url, engine_tasks, Path(tmp) / f"state{round_}", concurrency)
            engine.append(measured.row("engine", concurrency, _cpu_s(pid) - server, limit_per_s))
    rows = [_median_round(bare), _median_round(engine)]
    return {
        "bench": "realtime",
        "rounds": rounds,
        "latency_ms": round(latency_s * 1000, 3),
        "jitter_ms": round(jitter_s * 1000, 3),
        "physical_limit_per_s": round(limit_per_s, 1) if limit_per_s else None,
        "rows": rows,
        "engine_vs_bare": round(rows[1]["requests_per_s"] / rows[0]["requests_per_s"], 3),
        "engine_vs_bare_by_round": [
            round(e["requests_per_s"] / b["requests_per_s"], 3) for b, e in zip(bare, engine, strict=True)
        ],
        "cpus": os.cpu_count(),
    }


def _median_round(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(rows, key=lambda row: float(row["requests_per_s"]))[len(rows) // 2]


# --- ratelimit: the engine, a bare loop and the SDK's retries against an emulator enforcing limits ----------

SDK_MAX_RETRIES = 10
SENDERS = ("auto", "inline", "process")  # [limits] realtime_sender
# The emulator's buckets start full and refill continuously (batch_engine.emulator.ratelimit): the first
# successes are a burst of a full bucket plus what refills while that burst is answered (allow 5 s of it).
BURST_REFILL_S = 5.0


def _sustained_per_min(finished: list[tuple[float, int]], limit: int) -> float | None:
    """Per minute after the burst, of the amounts in (finish time, amount) pairs; None when all is burst."""
    done = sorted(finished)
    burst = limit * (1 + BURST_REFILL_S / 60)
    total = 0
    for index, (at, amount) in enumerate(done):
        total += amount
        if total >= burst:
            after, last = done[index + 1 :], done[-1][0]
            return sum(amount for _, amount in after) / (last - at) * 60 if after and last > at else None
    return None


def _ratelimit_row(client: str, measured: _Measured, calls: dict[str, int], limit: int, itpm: bool) -> dict[str, Any]:
    # RPM counts requests; ITPM counts the input tokens the server charged for each one.
    finished = measured.finished if itpm else [(at, 1) for at, _ in measured.finished]
    sustained = _sustained_per_min(finished, limit)
    sent = sum(calls.values())
    got_429 = calls.get("429", 0)
    # Of everything the server would have admitted during the run (a full bucket plus refill), the share used.
    admissible = limit * (1 + measured.seconds / 60)
    return {
        "client": client,
        "seconds": round(measured.seconds, 1),
        "sent": sent,
        "got_429": got_429,
        "429_per_100": round(100 * got_429 / sent, 2) if sent else None,
        "succeeded": len(measured.finished),
        "errors": measured.errors,
        "sustained_per_min": None if sustained is None else round(sustained),
        "sustained_of_limit": None if sustained is None else round(sustained / limit, 3),
        "used_of_admissible": round(sum(amount for _, amount in finished) / admissible, 3),
    }


def _on_fresh_emulator(options: list[str], measure: Callable[[str], _Measured]) -> tuple[_Measured, dict[str, int]]:
    """`measure(base_url)` against an emulator of its own (full buckets, no 429s of another client), and the
    emulator's count of Messages calls by status."""
    with emulator_process(*REPLY_TOKENS, *options) as emulator:
        measured = measure(emulator.base_url)
        calls: dict[str, int] = _emulator_stats(emulator.base_url)["calls"].get("POST /v1/messages", {})
    return measured, calls


def _limited_config(rpm: int, itpm: int | None) -> Config:
    """The default config, its limits set to the emulator's: the engine starts out knowing them."""
    config = load_config()
    limits = {"rpm": rpm} if itpm is None else {"rpm": rpm, "itpm": itpm}
    return config.model_copy(update={"limits": config.limits.model_copy(update=limits)})


def bench_ratelimit(
    requests: int, rpm: int, concurrency: int, itpm: int | None = None, pad_tokens: int = 0
) -> dict[str, Any]:
    """The same requests through the engine, a bare SDK loop without retries and one with the SDK's retries,
    each against a fresh emulator enforcing `rpm` (and `itpm`): 429s and the sustained rate against the limit
    (ITPM's in input tokens per minute when it is set)."""
    options = ["--rpm", str(rpm)] if itpm is None else ["--rpm", str(rpm), "--itpm", str(itpm)]
    config = _limited_config(rpm, itpm)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks.jsonl"
        _write_realtime_tasks(tasks, requests, "r", pad_tokens)
        params = [task.params for task in make_plan(iter_records(tasks), config, datetime.now(UTC)).tasks]
        clients: dict[str, Callable[[str], _Measured]] = {
            "engine": lambda url: _engine(url, tasks, Path(tmp) / "state", concurrency, config),
            "bare SDK, no retries": lambda url: asyncio.run(_bare(url, params, concurrency)),
            f"bare SDK, max_retries={SDK_MAX_RETRIES}": lambda url: asyncio.run(
                _bare(url, params, concurrency, max_retries=SDK_MAX_RETRIES)
            ),
        }
        limit = rpm if itpm is None else itpm
        rows = [
            _ratelimit_row(name, *_on_fresh_emulator(options, measure), limit, itpm is not None)
            for name, measure in clients.items()
        ]
    engine = rows[0]
    return {
        "bench": "ratelimit",
        "requests": requests,
        "concurrency": concurrency,
        "server_rpm": rpm,
        "server_itpm": itpm,
        "pad_tokens": pad_tokens,
        "limit": "rpm" if itpm is None else "itpm",
        "rows": rows,
        # The target: at least 0.95 of the limit, sustained, with at most 1 % of requests refused.
        "engine_meets_target": (engine["sustained_of_limit"] or 0) >= 0.95 and engine["429_per_100"] <= 1,
        "cpus": os.cpu_count(),
    }


# --- faults: the engine against bare SDK loops when the API misbehaves ------------------------------------------

# Of the injected faults: 40 % 429 (retry-after 1 s, capacity left), 30 % 529, 30 % 500, as in issue #16.
FAULT_MIX = (("429", 0.4), ("529", 0.3), ("500", 0.3))
FAULT_BARE_RETRIES = (2, SDK_MAX_RETRIES)
CURATOR = "Curator (Anthropic backend, its defaults)"


def _bare_run(base_url: str, params: list[dict[str, Any]], concurrency: int, max_retries: int) -> _Measured:
    return asyncio.run(_bare(base_url, params, concurrency, max_retries=max_retries))


def _curator_run(base_url: str, params: list[dict[str, Any]], concurrency: int, python: str) -> _Measured:
    """The same requests through Curator's Anthropic backend, in `python` (a venv of its own): see
    `batch_engine.bench.curator`. Curator keeps no per-request latency the bench could read."""
    first = params[0]
    spec = {
        "model": first["model"],
        "max_tokens": first["max_tokens"],
        "system": first.get("system"),
        "thinking": first.get("thinking"),
        "prompts": [request["messages"][-1]["content"] for request in params],
        "concurrency": concurrency,
    }
    with tempfile.NamedTemporaryFile("wb", suffix=".json") as spec_file:
        spec_file.write(orjson.dumps(spec))
        spec_file.flush()
        driver = Path(__file__).with_name("curator.py")
        done = subprocess.run(
            [python, str(driver), base_url, spec_file.name], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"the Curator round failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    return _Measured(len(params), float(result["seconds"]), 0.0, int(result["failed"]))


def _faults_row(client: str, measured: _Measured, calls: dict[str, int]) -> dict[str, Any]:
    latencies = sorted(measured.latencies_s)
    return {
        "client": client,
        "seconds": round(measured.seconds, 2),
        "sent": sum(calls.values()),
        "got_429": calls.get("429", 0),
        "got_5xx": calls.get("500", 0) + calls.get("529", 0),
        "failed": measured.errors,
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1) if latencies else None,
    }


def bench_faults(
    requests: int,
    concurrency: int,
    rounds: int,
    latency_s: float,
    fault_rate: float,
    rpm: int | None = None,
    curator_python: str | None = None,
    sender: str = "auto",
) -> dict[str, Any]:
    """The same realtime work through the engine and through bare SDK loops (`max_retries` 2 and 10, a
    semaphore of `concurrency`), and Curator when `curator_python` is given, each on a fresh emulator injecting
    `fault_rate` of Messages calls as 429/529/500 (and enforcing `rpm` if given), alternating for `rounds`
    rounds; each client's median round.

    Within a round every client's emulator has the same seed, so the n-th request of each meets the same fault.
    Latency is per task, from its first request to its answer, retries and their waits included."""
    options = ["--latency", str(latency_s)]
    for kind, share in FAULT_MIX:
        options += ["--fault-rate", f"{kind}={fault_rate * share:.6f}"]
    if rpm is not None:
        options += ["--rpm", str(rpm)]
    config = load_config() if rpm is None else _limited_config(rpm, None)
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"realtime_sender": sender})})
    load_before = os.getloadavg()[0]
    names = [f"bare SDK, max_retries={retries}" for retries in FAULT_BARE_RETRIES] + ["engine"]
    if curator_python is not None:
        names.append(CURATOR)
    by_client: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for index, name in enumerate(names):
                # Fresh prompts and a fresh ledger every round: nothing is answered from a previous one.
                tasks = Path(tmp) / f"{round_}-{index}.jsonl"
                _write_realtime_tasks(tasks, requests, f"f{round_}-{index}-")
                measure: Callable[[str], _Measured]
                if name == "engine":
                    state = Path(tmp) / f"state{round_}"
                    measure = partial(
                        _engine, tasks=tasks, state=state, concurrency=concurrency, config=config, task_latency=True
                    )
                else:
                    plan = make_plan(iter_records(tasks), config, datetime.now(UTC), route="realtime")
                    params = [task.params for task in plan.tasks]
                    if name == CURATOR:
                        assert curator_python is not None
                        measure = partial(_curator_run, params=params, concurrency=concurrency, python=curator_python)
                    else:
                        retries = FAULT_BARE_RETRIES[index]
                        measure = partial(_bare_run, params=params, concurrency=concurrency, max_retries=retries)
                measured, calls = _on_fresh_emulator([*options, "--seed", str(16 + round_)], measure)
                by_client[name].append(_faults_row(name, measured, calls))
    rows = [sorted(runs, key=lambda row: float(row["seconds"]))[len(runs) // 2] for runs in by_client.values()]
    bare_rows, engine = rows[:2], rows[2]
    fastest_bare = min(bare_rows, key=lambda row: float(row["seconds"]))
    return {
        "bench": "faults",
        "requests": requests,
        "concurrency": concurrency,
        "latency_ms": round(latency_s * 1000, 3),
        "fault_rate": fault_rate,
        "server_rpm": rpm,
        "realtime_sender": sender,
        "rounds": rounds,
        # A shared machine: the 1-minute load average when the bench started and when it ended.
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
        "seconds_by_round": {name: [row["seconds"] for row in runs] for name, runs in by_client.items()},
        # The target: no slower than the fastest bare loop, with no task failed.
        "engine_vs_fastest_bare_seconds": round(engine["seconds"] / fastest_bare["seconds"], 3),
        "engine_vs_each_seconds": {
            r["client"]: round(engine["seconds"] / r["seconds"], 3) for r in rows if r is not engine
        },
        "engine_vs_bare_by_round": [
            round(e["seconds"] / min(b2["seconds"], b10["seconds"]), 3)
            for b2, b10, e in zip(*list(by_client.values())[:3], strict=True)
        ],
        "cpus": os.cpu_count(),
    }


def _print_faults(result: dict[str, Any]) -> None:
    rpm = "" if result["server_rpm"] is None else f", emulator RPM {result['server_rpm']}"
    print(
        f"{result['requests']} realtime tasks at concurrency {result['concurrency']}, latency {result['latency_ms']} "
        f"ms, {result['fault_rate']:.0%} of Messages calls faulted (429 retry-after 1 s / 529 / 500 = 4:3:3){rpm}; "
        f"engine's realtime_sender {result['realtime_sender']}; "
        f"each client on a fresh emulator, median of {result['rounds']} alternating rounds, {result['cpus']} CPUs "
        f"at load {result['load_avg'][0]} → {result['load_avg'][1]}; latency per task, retries included"
    )
    print_table(result["rows"])
    print(
        f"engine / fastest bare loop, seconds: {result['engine_vs_fastest_bare_seconds']} "
        f"(by round: {result['engine_vs_bare_by_round']}); against each: {result['engine_vs_each_seconds']}"
    )
    print(orjson.dumps(result).decode())


def print_table(rows: list[dict[str, Any]], keys: list[str] | None = None) -> None:
    """Rows as a Markdown table (None shows as n/a); the columns are `keys`, default the first row's."""
    keys = list(rows[0]) if keys is None else keys
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join("n/a" if row[key] is None else str(row[key]) for key in keys) + " |")


def _print_realtime(result: dict[str, Any]) -> None:
    rows = result["rows"]
    limit = result["physical_limit_per_s"]
    print(
        f"concurrency {rows[0]['concurrency']}, latency {result['latency_ms']} ms + jitter 0..{result['jitter_ms']} "
        f"ms, physical limit {'n/a' if limit is None else f'{limit} requests/s'}, {result['cpus']} CPUs, "
        f"median of {result['rounds']} rounds"
    )
    print_table(rows, [key for key in rows[0] if key != "concurrency"])
    print(f"engine / bare throughput: {result['engine_vs_bare']} (by round: {result['engine_vs_bare_by_round']})")
    print(orjson.dumps(result).decode())


def _print_ratelimit(result: dict[str, Any]) -> None:
    unit = "requests" if result["limit"] == "rpm" else "input tokens"
    itpm = "" if result["server_itpm"] is None else f", ITPM {result['server_itpm']}"
    print(
        f"{result['requests']} requests at concurrency {result['concurrency']} (+{result['pad_tokens']} tokens "
        f"of padding each), emulator RPM {result['server_rpm']}{itpm}; rates in {unit} per minute, each client "
        f"against a fresh emulator, {result['cpus']} CPUs"
    )
    print_table(result["rows"])
    print(f"engine meets >= 0.95 of the limit with <= 1 % 429s: {result['engine_meets_target']}")
    print(orjson.dumps(result).decode())


def print_result(result: dict[str, Any]) -> None:
    """One result as a one-row Markdown table, then as a JSON line."""
    print_table([result])
    print(orjson.dumps(result).decode())


# A 10-field extraction schema (nested object, enums, arrays, a nullable field): the validation benchmark's subject.
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "date", "vendor", "currency", "total", "status", "tags", "items", "paid", "note"],
    "properties": {
        "id": {"type": "string"},
        "date": {"type": "string", "format": "date"},
        "vendor": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "country"],
            "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
        },
        "currency": {"type": "string", "enum": ["USD", "EUR", "GBP"]},
        "total": {"type": "number"},
        "status": {"type": "string", "enum": ["paid", "due", "overdue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["sku", "qty"],
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            },
        },
        "paid": {"type": "boolean"},
        "note": {"type": ["string", "null"]},
    },
}


def bench_validate(rows: int) -> dict[str, Any]:
    """CPU time per row to parse an answer's JSON text and validate it against a 10-field schema (compiled once)."""
    from batch_engine.structured_output import OutputSpec

    started = time.process_time()
    spec = OutputSpec.of(BENCH_SCHEMA, "output_config")
    compile_ms = (time.process_time() - started) * 1000
    answers = []
    for i in range(rows):
        value = {
            "id": f"INV-{i}", "date": "2026-11-01", "vendor": {"name": "Acme", "country": "DE"},
            "currency": "EUR", "total": i / 7, "status": "due", "tags": ["a", "b"],
            "items": [{"sku": f"s{i}", "qty": i % 9}, {"sku": "x", "qty": 1}], "paid": bool(i % 2),
            "note": None if i % 3 else "late",
        }  # fmt: skip
        answers.append(orjson.dumps(value).decode())
    content: list[dict[str, Any]] = []
    values = [orjson.loads(text) for text in answers]
    started = time.process_time()
    for value in values:
        spec.validate(value, "$")
    validate_s = time.process_time() - started
    started = time.process_time()
    invalid = 0
    for text in answers:
        invalid += spec.parse(content, text)[1] is not None
    parse_s = time.process_time() - started
    assert invalid == 0
    return {
        "rows": rows,
        "fields": len(BENCH_SCHEMA["properties"]),
        "compile_ms": round(compile_ms, 3),
        "validate_us_per_row": round(validate_s / rows * 1e6, 2),
        "parse_and_validate_us_per_row": round(parse_s / rows * 1e6, 2),
        "target_us_per_row": 50,
    }


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
    realtime.add_argument("--latency", type=_duration, default=0.0, help="emulator latency, e.g. 100ms (0: CPU-bound)")
    realtime.add_argument("--jitter", type=_duration, default=0.0, help="emulator's random extra latency, 0..JITTER")
    ratelimit = sub.add_parser(
        "ratelimit", help="engine vs bare SDK loops (no retries; SDK retries) against an emulator enforcing limits"
    )
    ratelimit.add_argument("--requests", type=int, default=1000)
    ratelimit.add_argument("--rpm", type=int, default=600)
    ratelimit.add_argument("--itpm", type=int, default=None, help="also enforce ITPM; rates are then in tokens/min")
    ratelimit.add_argument(
        "--pad-tokens", type=int, default=0, help="filler tokens per prompt, so ITPM binds before RPM"
    )
    ratelimit.add_argument("--concurrency", type=int, default=32)
    faults = sub.add_parser("faults", help="engine vs bare SDK loops (max_retries 2 and 10) under injected faults")
    faults.add_argument("--requests", type=int, default=1000)
    faults.add_argument("--concurrency", type=int, default=32)
    faults.add_argument("--rounds", type=int, default=3, help="alternate the three clients this many times")
    faults.add_argument("--latency", type=_duration, default=0.1, help="emulator latency (default 100ms)")
    faults.add_argument("--fault-rate", type=float, default=0.1, help="share of Messages calls that fail")
    faults.add_argument("--rpm", type=int, default=None, help="also enforce this RPM (the engine is told it)")
    faults.add_argument("--sender", choices=SENDERS, default="auto", help="the engine's [limits] realtime_sender")
    faults.add_argument(
        "--curator-python",
        default=None,
        help="also run Curator with this interpreter (a venv with bespokelabs-curator; see bench/curator.py)",
    )
    startup = sub.add_parser("startup", help="`batch-engine run` vs a bare SDK loop, each a fresh process: start-up")
    startup.add_argument("--requests", type=int, default=1000)
    startup.add_argument("--concurrency", type=int, default=32)
    startup.add_argument("--latency", type=_duration, default=0.25, help="emulator latency (default 250ms)")
    startup.add_argument("--rounds", type=int, default=3, help="alternate bare/engine this many times")
    startup.add_argument("--prefect-rounds", type=int, default=0, help="also time `run --prefect` this many times")
    state = sub.add_parser("state", help="the same realtime and batch runs on SQLite and on --state-url, side by side")
    state.add_argument("--state-url", required=True, help="postgresql://... (an empty database is best)")
    state.add_argument("--realtime", type=int, default=10_000, help="realtime tasks per run")
    state.add_argument("--batch", type=int, default=100_000, help="batch tasks per run")
    state.add_argument("--concurrency", type=int, default=32)
    state.add_argument("--rounds", type=int, default=1, help="alternate the backends this many times")
    prefect = sub.add_parser(
        "prefect", help="the Prefect flow vs the engine alone (python -m batch_engine.bench.prefect_flow)"
    )
    prefect.add_argument("--tasks", type=int, default=10_000)
    prefect.add_argument("--rounds", type=int, default=3)
    prefect.add_argument("--concurrency", type=int, default=64)
    million = sub.add_parser("million", help="`batch-engine run` on a generated nightly job (default 1M tasks)")
    million.add_argument("--tasks", type=int, default=1_000_000, help="develop with 100000")
    million.add_argument("--batch-duration", type=_duration, default=20.0, help="emulator batch duration (20s)")
    million.add_argument("--keep", type=Path, default=None, help="keep the files in this directory")
    million.add_argument("--sender", choices=SENDERS, default="auto", help="[limits] realtime_sender (auto)")
    validate = sub.add_parser("validate", help="CPU per row to validate answers against a 10-field output schema")
    validate.add_argument("--rows", type=int, default=100_000)
    emulator_cpu = sub.add_parser("emulator-cpu", help="the emulator's CPU per batch row and per Messages request")
    emulator_cpu.add_argument("--tasks", type=int, default=20_000, help="tasks of the million benchmark's mix")
    emulator_cpu.add_argument("--rounds", type=int, default=3, help="the least CPU of this many rounds is printed")
    args = parser.parse_args(argv)
    # The engine logs each lane's progress; a benchmark prints only its figures.
    logging.getLogger("batch_engine").setLevel(logging.WARNING)
    if args.name == "prefect":
        # Prefect takes seconds to import and is an optional layer on top: only this benchmark loads it.
        from batch_engine.bench.prefect_flow import main as prefect_main

        return prefect_main(
            ["--tasks", str(args.tasks), "--rounds", str(args.rounds), "--concurrency", str(args.concurrency)]
        )
    if args.name in ("plan", "batch", "cost"):
        from batch_engine.bench import pipeline

        if args.name == "plan":
            results = pipeline.bench_plan(args.tasks, args.config)
            if args.json_only:
                print(orjson.dumps(results[0]).decode())
            else:
                pipeline.print_plan(results)
        elif args.name == "batch":
            print_result(pipeline.bench_batch(args.tasks, args.poll_interval))
        else:
            tasks_file = args.tasks_file or pipeline.SAMPLES / "nightly_tasks.json"
            config = args.config or pipeline.SAMPLES / "config.toml"
            print_result(pipeline.bench_cost(tasks_file, config, args.poll_interval))
    elif args.name == "million":
        from batch_engine.bench.million import bench_million

        print_result(bench_million(args.tasks, args.batch_duration, args.keep, args.sender))
    elif args.name == "validate":
        print_result(bench_validate(args.rows))
    elif args.name == "emulator-cpu":
        from batch_engine.bench.emulator_cpu import bench_emulator_cpu

        print_result(bench_emulator_cpu(args.tasks, args.rounds))
    elif args.name == "faults":
        _print_faults(
            bench_faults(
                args.requests,
                args.concurrency,
                args.rounds,
                args.latency,
                args.fault_rate,
                args.rpm,
                args.curator_python,
                args.sender,
            )
        )
    elif args.name == "startup":
        from batch_engine.bench.startup import bench_startup, print_startup

        print_startup(bench_startup(args.requests, args.concurrency, args.latency, args.rounds, args.prefect_rounds))
    elif args.name == "state":
        from batch_engine.bench.state import bench_state

        bench_state(args.state_url, args.realtime, args.batch, args.concurrency, args.rounds)
    elif args.name == "realtime":
        _print_realtime(bench_realtime(args.requests, args.concurrency, args.rounds, args.latency, args.jitter))
    else:
        _print_ratelimit(bench_ratelimit(args.requests, args.rpm, args.concurrency, args.itpm, args.pad_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up benchmark: `batch-engine run` launched as a user launches it, against a bare SDK loop launched the same
way, on one emulator process (`python -m batch_engine.bench startup --requests 1000 --latency 250ms`).

For each client, a fresh process per round: the time from launching it to the first API request the emulator
sees, and the process's whole wall time. Rounds alternate bare / engine (a shared machine is noisy); medians are
reported. `--prefect-rounds N` also times `batch-engine run --prefect` (the flow on Prefect's temporary server,
with a Prefect home of its own that the first such round migrates, as a new user's first run does).
"""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batch_engine.bench.engine import REPLY_TOKENS, _emulator_stats, _write_realtime_tasks, print_table
from batch_engine.config import load_config
from batch_engine.emulator import emulator_process
from batch_engine.files import iter_records
from batch_engine.planning import make_plan

# What the engine is compared with: the SDK, a semaphore and one gather, its params ready-made in a file.
_BARE_LOOP = """
import asyncio, json, sys
import anthropic

async def main(path, concurrency):
    with open(path) as handle:
        requests = [json.loads(line) for line in handle]
    client = anthropic.AsyncAnthropic(max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)
    async def one(request):
        async with semaphore:
            return (await client.messages.create(**request)).content
    results = await asyncio.gather(*(one(request) for request in requests))
    with open(path + ".out", "w") as handle:
        json.dump([[block.model_dump() for block in content] for content in results], handle)
    await client.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _launch(command: list[str], env: dict[str, str], base_url: str) -> dict[str, float]:
    """Run `command` to its end; seconds from launch to the emulator's first request, and in all."""
    with urllib.request.urlopen(urllib.request.Request(f"{base_url}/_emulator/reset", method="POST"), timeout=30):
        pass
    launched = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    wall = time.time() - launched
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} exited {done.returncode}: {done.stderr[-2000:]}")
    stats = _emulator_stats(base_url)
    first = stats["first_request_at"]
    return {"first_request_s": first - launched, "wall_s": wall, "messages": stats["messages_succeeded"]}


def _row(client: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "client": client,
        "launch to first request (s)": round(statistics.median(r["first_request_s"] for r in runs), 2),
        "process wall (s)": round(statistics.median(r["wall_s"] for r in runs), 2),
        "rounds": ", ".join(f"{r['first_request_s']:.2f} / {r['wall_s']:.2f}" for r in runs),
    }


def bench_startup(
    requests: int, concurrency: int, latency_s: float, rounds: int, prefect_rounds: int
) -> dict[str, Any]:
    """Median launch-to-first-request and process wall of the engine's CLI and of a bare SDK loop."""
    config = load_config()
    cli = Path(sys.executable).with_name("batch-engine")
    # The bare loop's `anthropic` was compiled to bytecode when pip installed it. An editable install of this
    # package is compiled at its first launch, or at every launch under PYTHONDONTWRITEBYTECODE: compiled here
    # first, so both clients start as a user's second run does.
    compileall.compile_dir(Path(__file__).resolve().parents[1], quiet=1)
    bare: list[dict[str, float]] = []
    engine: list[dict[str, float]] = []
    flow: list[dict[str, float]] = []
    emulator = emulator_process(*REPLY_TOKENS, "--latency", str(latency_s))
    with tempfile.TemporaryDirectory() as tmp_dir, emulator as running:
        base_url = running.base_url
        tmp = Path(tmp_dir)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "ANTHROPIC_"))}
        env.update(ANTHROPIC_API_KEY="bench", ANTHROPIC_BASE_URL=base_url)
        for round_ in range(rounds + prefect_rounds):
            # Fresh prompts every round: nothing is answered from a previous one.
            tasks = tmp / f"tasks{round_}.jsonl"
            _write_realtime_tasks(tasks, requests, f"r{round_}-")
            run_args = ["run", str(tasks), "-o", str(tmp / f"out{round_}.json"), "--realtime-only"]
            run_args += ["--concurrency", str(concurrency), "--state-dir", str(tmp / f"state{round_}")]
            if round_ >= rounds:
                home = tmp / "prefect-home"
                home.mkdir(exist_ok=True)
                flow_env = {**env, "PREFECT_HOME": str(home)}
                flow.append(_launch([str(cli), *run_args, "--prefect"], flow_env, base_url))
                continue
            params = tmp / f"params{round_}.jsonl"
            plan = make_plan(iter_records(tasks), config, datetime.now(UTC), route="realtime")
            params.write_bytes(b"".join(orjson.dumps(task.params) + b"\n" for task in plan.tasks))
            bare.append(_launch([sys.executable, "-c", _BARE_LOOP, str(params), str(concurrency)], env, base_url))
            engine.append(_launch([str(cli), *run_args], env, base_url))
    rows = [_row("bare SDK loop (python -c)", bare), _row("batch-engine run", engine)]
    if flow:
        rows.append(_row("batch-engine run --prefect", flow))
    bare_wall = statistics.median(r["wall_s"] for r in bare)
    return {
        "bench": "startup",
        "requests": requests,
        "concurrency": concurrency,
        "latency_ms": round(latency_s * 1000, 3),
        "rounds": rounds,
        "rows": rows,
        "engine_wall_vs_bare": round(statistics.median(r["wall_s"] for r in engine) / bare_wall, 3),
        "engine_wall_vs_bare_by_round": [
            round(e["wall_s"] / b["wall_s"], 3) for b, e in zip(bare, engine, strict=True)
        ],
        "prefect_wall_vs_bare": round(statistics.median(r["wall_s"] for r in flow) / bare_wall, 3) if flow else None,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }


def print_startup(result: dict[str, Any]) -> None:
    print(
        f"{result['requests']} realtime requests, concurrency {result['concurrency']}, emulator latency "
        f"{result['latency_ms']} ms, {result['cpus']} CPUs, median of {result['rounds']} alternating rounds "
        f"(each round: launch to first request / wall, s)"
    )
    print_table(result["rows"])
    print(
        f"engine / bare process wall: {result['engine_wall_vs_bare']} "
        f"(by round: {result['engine_wall_vs_bare_by_round']})"
    )
    print(orjson.dumps(result).decode())

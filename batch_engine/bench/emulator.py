"""How many Messages requests per second the emulator serves at zero latency, measured with the async SDK.

    python -m batch_engine.bench.emulator --requests 2000 --concurrency 32

`--mode process` (default) serves the emulator from its own process, as `batch-engine emulator` does, so
client and server each get a core; `--mode thread` serves it from a thread of the client's process, as tests
and `--emulate` runs do. Prints a Markdown table and one JSON line; in process mode it also reports the
server's CPU time per request, i.e. what one emulator could serve if the client were not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import orjson

from batch_engine.emulator.process import emulator_process
from batch_engine.emulator.server import start_emulator
from batch_engine.emulator.settings import EmulatorSettings

MODEL = "claude-haiku-5-5"


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) of a process, from /proc; None where that is not available."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _emulator_process() -> Iterator[tuple[str, int | None]]:
    with emulator_process("--reply-tokens", "32") as emulator:
        yield emulator.base_url, emulator.pid


@contextmanager
def _emulator_thread() -> Iterator[tuple[str, int | None]]:
    with start_emulator(EmulatorSettings(reply_tokens=32)) as emulator:
        yield emulator.base_url, None  # shares the client's process: its CPU cannot be told apart


async def _drive(base_url: str, requests: int, concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    next_index = 0
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="bench", max_retries=0) as client:

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < requests:
                index = next_index
                next_index += 1
                started = time.perf_counter()
                try:
                    await client.messages.create(
                        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": f"request {index}"}]
                    )
                except anthropic.APIError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        await client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "warm"}])
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, errors


def run_benchmark(requests: int, concurrency: int, mode: str) -> dict[str, Any]:
    """Serve an emulator (own process or thread), send `requests` Messages calls, return the figures."""
    serve = _emulator_process if mode == "process" else _emulator_thread
    with serve() as (base_url, server_pid):
        cpu_before = _cpu_seconds(server_pid)
        elapsed, latencies, errors = asyncio.run(_drive(base_url, requests, concurrency))
        cpu_after = _cpu_seconds(server_pid)
    latencies.sort()
    server_cpu_ms = None
    if cpu_before is not None and cpu_after is not None:
        server_cpu_ms = round((cpu_after - cpu_before) / requests * 1000, 3)
    return {
        "bench": "emulator",
        "mode": mode,
        "requests": requests,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(requests / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
        "errors": errors,
        # What one emulator process could serve on one core if the client were not the bottleneck.
        "server_cpu_ms_per_request": server_cpu_ms,
        "server_capacity_rps": round(1000 / server_cpu_ms) if server_cpu_ms else None,
        "cpus": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_engine.bench.emulator", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--mode", choices=("process", "thread"), default="process")
    args = parser.parse_args(argv)
    result = run_benchmark(args.requests, args.concurrency, args.mode)
    print("| mode | requests | concurrency | seconds | requests/s | p50 ms | p99 ms | server CPU ms/req | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {result['mode']} | {result['requests']} | {result['concurrency']} | {result['seconds']} | "
        f"{result['requests_per_s']} | {result['p50_ms']} | {result['p99_ms']} | "
        f"{result['server_cpu_ms_per_request'] or 'n/a'} | {result['errors']} |"
    )
    print(orjson.dumps(result).decode())
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""`batch-engine bench NAME ...`: runs `python -m batch_engine.bench NAME ...` (the benchmarks are not imported)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `bench` on the `batch-engine` parser."""
    # Everything after the name goes to the benchmark's own parser (`batch-engine bench plan --help`).
    bench = sub.add_parser("bench", help="benchmarks: plan, batch, cost, realtime, ratelimit, prefect")
    bench.add_argument("benchmark", help="plan, batch, cost, realtime, ratelimit or prefect")
    bench.add_argument("arguments", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    # A subprocess, not an import: the benchmarks sit above the library and nothing in it imports them.
    import subprocess

    command = [sys.executable, "-m", "batch_engine.bench", args.benchmark, *args.arguments]
    return subprocess.run(command, check=False).returncode

"""What the crash tests kill: one `batch_engine.runner.run` of a task file in this process, against the API in
`ANTHROPIC_API_KEY` / `ANTHROPIC_BASE_URL`, with `BATCH_ENGINE_CRASH_AT` naming the point to die at.

It is `batch-engine run` without the Prefect flow around it: the same ledger, lanes and output writer, without
~20 s of start-up (importing Prefect, starting its temporary server). `forked` runs it in a process forked from
a multiprocessing forkserver that imported the engine once, which saves the ~2 s import of `anthropic` per run
as well: that is what lets tests/engine/test_crash_points.py kill and re-run a real process at every crash point in
about a minute.

    python tests/support/crash_driver.py INPUT -o OUTPUT --state-dir DIR [--config F] [--batch-only] [--batch-timeout S]
        [--resume-run KEY] [--supersede]

Exit 0: every task succeeded; 1: some failed; 2: a BatchEngineError (one `Error:` line), like the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from batch_engine.client import api_from_environment
from batch_engine.config import load_config
from batch_engine.crashpoints import arm
from batch_engine.errors import BatchEngineError, ConfigError
from batch_engine.runner import RunOptions, run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crash_driver")
    parser.add_argument("input", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--batch-only", dest="mode", action="store_const", const="batch")
    parser.add_argument("--batch-timeout", type=float, default=None)
    parser.add_argument("--resume-run", default=None)
    parser.add_argument("--supersede", action="store_true")
    args = parser.parse_args(argv)
    try:
        api = api_from_environment()
        if api is None:
            raise ConfigError("no API key: set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for the emulator)")
        options = RunOptions(
            state_dir=args.state_dir,
            mode=args.mode,
            batch_timeout_s=args.batch_timeout,
            config_path=args.config,
            resume_run=args.resume_run,
            supersede=args.supersede,
        )
        summary = asyncio.run(run(args.input, args.output, api=api, config=load_config(args.config), options=options))
    except BatchEngineError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary.counts['succeeded']} of {summary.counts['total']} succeeded")
    return 0 if summary.all_succeeded else 1


def forked(argv: list[str], cwd: str, env: dict[str, str], crash_at: str, stdout: str, stderr: str) -> None:
    """`main(argv)` in a freshly forked worker: its own directory, environment, crash point and output files."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    arm(crash_at)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.exit(main(argv))


if __name__ == "__main__":
    sys.exit(main())

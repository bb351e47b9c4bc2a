"""What the crash tests kill: `batch-engine run` of a task file, in this process, against the API in
`ANTHROPIC_API_KEY` / `ANTHROPIC_BASE_URL`, with `BATCH_ENGINE_CRASH_AT` naming the point to die at.

It is the command users run (`batch_engine.cli.main(["run", ...])`), so it takes the path they take: in this
process without Prefect when no Prefect server is configured, or the `batch-orchestrator` flow, each phase a
task run, when `PREFECT_API_URL` is set (tests/engine/test_crash_points.py runs both). `forked` runs it in a process
forked from a multiprocessing forkserver that imported the engine once, which saves the ~2 s import of
`anthropic` per run: that is what lets the crash tests kill and re-run a real process at every crash point in
about a minute. The flow path runs as a plain subprocess (Prefect reads its settings when it is imported).

    python tests/support/crash_driver.py INPUT -o OUTPUT --state-dir DIR [--config F] [--batch-only]
        [--batch-timeout S] [--resume-run KEY] [--supersede] [--state-url URL]

Exit 0: every task succeeded; 1: some failed; 2: a BatchEngineError (one `Error:` line), as the CLI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# Imported here, not when the command runs, so that the forkserver preloads them for every worker.
import batch_engine.render.terminal
import batch_engine.runner  # noqa: F401
from batch_engine.cli import main as cli_main
from batch_engine.crashpoints import arm


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["run", *(sys.argv[1:] if argv is None else argv)])


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

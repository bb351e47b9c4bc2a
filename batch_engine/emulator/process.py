"""The emulator in a process of its own (`batch-engine emulator --port 0 ...`): for benchmarks that must not share
the measured process's CPU and for tests whose emulator outlives the processes they kill. In a thread of the
caller's process, use `start_emulator` instead."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# The CLI announces itself with this line on stdout once it listens (batch_engine/cli/emulator.py).
_LISTENING = re.compile(r"http://[\d.]+:\d+")


@dataclass(frozen=True)
class EmulatorProcess:
    """A running emulator process: where it listens, and the process (its own session, so its own group)."""

    base_url: str
    process: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def emulator_process(
    *options: str,
    env: Mapping[str, str] | None = None,
    stderr: int | None = None,
    start_timeout_s: float = 60.0,
    stop_timeout_s: float = 15.0,
) -> Iterator[EmulatorProcess]:
    """`batch-engine emulator --port 0 OPTIONS` started, waited for until it listens, and stopped on exit.

    Stopped as a user stops it, with Ctrl-C (SIGINT: a `--state-file` is saved), then its whole process group is
    killed if it has not exited within `stop_timeout_s`. `stderr` is passed to Popen (None: this process's).
    """
    command = [sys.executable, "-m", "batch_engine.cli", "emulator", "--port", "0", *options]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
        env=None if env is None else dict(env),
    )
    try:
        yield EmulatorProcess(_wait_listening(process, start_timeout_s), process)
    finally:
        _stop(process, stop_timeout_s)


def _wait_listening(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:  # stdout closed: the process has exited
            break
        lines.append(line)
        found = _LISTENING.search(line)
        if found:
            return found.group(0)
    raise RuntimeError(f"the emulator did not start (exit code {process.poll()}): {''.join(lines)[-2000:]!r}")


def _stop(process: subprocess.Popen[str], timeout_s: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its session
    process.wait()
    if process.stdout is not None:
        process.stdout.close()

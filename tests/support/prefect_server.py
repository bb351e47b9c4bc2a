"""A real `prefect server start` for the tests that need one (deployments, workers, schedules): started on a free
port over a copy of the session's migrated database, stopped by PID, and anything left carrying its PREFECT_HOME
killed at the end; plus the process helpers those tests use to start and stop their own processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).with_name("prefect")


@dataclass(frozen=True)
class Server:
    api_url: str
    home: Path
    env: dict[str, str]
    pid: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_process(args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """`args` in a session of its own, output to `log`."""
    # A session of its own, so stopping it also stops whatever it spawned (uvicorn, flow-run processes).
    return subprocess.Popen(
        args, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's session (SIGKILL after 10 s); the group is killed even when the leader is gone."""
    if proc.poll() is None:
        with _suppress_missing():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with _suppress_missing():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    else:
        # The leader is gone; its group may not be.
        with _suppress_missing():
            os.killpg(proc.pid, signal.SIGKILL)


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return exc_type is ProcessLookupError or exc_type is PermissionError


def pids_with_env(marker: bytes) -> list[int]:
    """Every other process whose environment holds `marker` (`NAME=value`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _sweep(home: Path) -> list[int]:
    """Kill (and return) every process still running with this module's PREFECT_HOME."""
    leftovers = pids_with_env(f"PREFECT_HOME={home}".encode())
    for pid in leftovers:
        with _suppress_missing():
            os.kill(pid, signal.SIGKILL)
    return leftovers


def _wait_healthy(api_url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{api_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"prefect server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running_server(
    home: Path, migrated_prefect_db: Path, extra_env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[Server]:
    """A `prefect server start` on a free port over a copy of the migrated DB; stopped (and swept) on exit.

    `extra_env` adds settings to the server's (and its clients') environment; `log` is where the server's output
    goes (default: `server.log` in `home`).
    """
    shutil.copy(migrated_prefect_db, home / "prefect.db")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "ANTHROPIC_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Serve processes look for scheduled runs every second instead of every ten.
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        **(extra_env or {}),
    )
    log = log or home / "server.log"
    proc = start_process(
        [str(PREFECT), "server", "start", "--no-ui", "--host", "127.0.0.1", "--port", str(port)], env, log
    )
    try:
        _wait_healthy(api_url, proc, log)
        yield Server(api_url=api_url, home=home, env=env, pid=proc.pid)
    finally:
        stop_process(proc)
        _sweep(home)

"""Prefect's temporary server for a `batch-engine run` without PREFECT_API_URL, made to die with the CLI.

Prefect's ephemeral mode starts a uvicorn subprocess and stops it at exit, but a CLI killed with SIGKILL or
SIGTERM never reaches its exit handlers and leaves that server running. So the CLI starts the same server up
front and tells its pid to a tiny reaper process that reads a pipe from the CLI: when the pipe closes without
the line "done" (the CLI died), the reaper stops the server.

The server's own output (uvicorn, its services' warnings) goes to a log file in the state dir, not the user's
terminal; its path is shown only when the server fails to start. Its telemetry service is off: offline it only
logs errors ("Failed to send telemetry") and, under load, "database is locked" tracebacks.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect.server.api.server import SubprocessASGIServer

from batch_engine.errors import BatchEngineError
from batch_engine.runner import DEFAULT_STATE_DIR

SERVER_LOG = "prefect-server.log"
# A first run migrates a fresh Prefect database, which takes well over Prefect's default 20 s on a busy machine.
STARTUP_TIMEOUT_S = 90
# What uvicorn logs when the app's start-up failed (a database it cannot open, a migration that failed), just
# before it exits with code 3.
_STARTUP_FAILED = "Application startup failed"

_REAPER = """
import os, signal, sys, time
pid = None
for line in sys.stdin.buffer:
    if line.strip() == b"done":
        sys.exit(0)
    pid = int(line)
if pid is not None:
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class _LoggedServer(SubprocessASGIServer):
    """Prefect's temporary server with its output in a log file instead of the user's terminal."""

    log_path: Path

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        with _output_to(self.log_path):
            return super()._run_uvicorn_command()


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Point this process's stdout and stderr at `path` while a child is started, so the child inherits it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)


def start_ephemeral_server(state_dir: Path = DEFAULT_STATE_DIR) -> int | None:
    """Start Prefect's temporary server now and make sure it dies with us; its pid (None with PREFECT_API_URL)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    # Read by the server process from the environment it inherits, unless the user chose otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Registered as the instance ephemeral mode itself uses: the flow's client finds it running and reuses it.
    server = _LoggedServer()
    server.log_path = state_dir / SERVER_LOG
    timeout = max(STARTUP_TIMEOUT_S, settings.server.ephemeral.startup_timeout_seconds)
    try:
        return _start(server, timeout)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise BatchEngineError(
            f"Prefect's temporary server did not start ({reason}); its log: {server.log_path}"
        ) from exc


def _start(server: SubprocessASGIServer, timeout: int) -> int | None:
    if os.name != "posix":
        server.start(timeout)
        return None
    reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER],
        stdin=subprocess.PIPE,
        # Its own session: killing the CLI's process group must not take the reaper with it.
        start_new_session=True,
    )
    assert reaper.stdin is not None
    pipe = reaper.stdin

    def tell(pid: int) -> None:
        pipe.write(f"{pid}\n".encode())
        pipe.flush()

    def release() -> None:
        # Registered before the server starts, so it runs after Prefect's own exit handler has stopped it.
        pipe.write(b"done\n")
        pipe.close()
        reaper.wait(timeout=10)

    atexit.register(release)
    log_path: Path | None = getattr(server, "log_path", None)
    log_start = log_path.stat().st_size if log_path is not None and log_path.exists() else 0
    # Prefect's start() waits out its whole timeout for a server that has died (it restarts one that exits with
    # uvicorn's code 3, taking it for a port already taken, which is also the code of a failed start-up), so it
    # runs in a daemon thread while this one watches the process and its log, and gives up as soon as it failed.
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            server.start(timeout)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    threading.Thread(target=start, name="prefect-temporary-server", daemon=True).start()
    told = None
    while not outcome:
        process = server.server_process
        if process is not None and process.pid != told:
            # The server process exists long before it answers /health: its pid is told as soon as it exists,
            # and again when Prefect starts another one.
            told = process.pid
            tell(told)
        failed = None
        if process is not None and process.poll() not in (None, 3):
            failed = f"its process exited with code {process.returncode}"
        elif log_path is not None and _STARTUP_FAILED in _read_from(log_path, log_start):
            failed = "its start-up failed"
        if failed is not None:
            _stop(server)
            raise RuntimeError(failed)
        time.sleep(0.05)
    if outcome[0] is not None:
        raise outcome[0]
    assert server.server_process is not None
    tell(server.server_process.pid)
    return server.server_process.pid


def _stop(server: SubprocessASGIServer) -> None:
    """Stop the server process, and any Prefect's start() puts in its place meanwhile (after a code-3 exit)."""
    stopped = None
    for _ in range(20):
        process = server.server_process
        if process is not None and process is not stopped:
            process.kill()
            process.wait(timeout=10)
            stopped = process
        time.sleep(0.1)


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""

"""Helpers for tests that kill real engine processes: config files, running tests/support/crash_driver.py, and reading
what the emulator really holds (every batch and its custom_ids) through the public API."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from batch_engine.client import ApiSettings, BatchInfo, batch_results, list_batches, make_client
from batch_engine.config import default_config_text
from batch_engine.crashpoints import ENV_VAR

DRIVER = Path(__file__).resolve().parent / "crash_driver.py"
# The repository root (not tests/: on sys.path, tests/prefect/ would shadow the prefect package).
ROOT = DRIVER.parents[2]
RUN_TIMEOUT_S = 90.0


def config_file(path: Path, **limits: object) -> Path:
    """The shipped config with some `[limits]` values replaced (e.g. fast polling for a fast emulator)."""
    text = default_config_text()
    for key, value in limits.items():
        text, found = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
        assert found, f"no [limits] key {key} in the shipped config"
    path.write_text(text, encoding="utf-8")
    return path


def engine_env(base_url: str, crash_at: str | None = None, prefect_api_url: str | None = None) -> dict[str, str]:
    """The environment of an engine process: the API at `base_url`; the Prefect server at `prefect_api_url`, whose
    presence makes `batch-engine run` run the flow (else it runs in-process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "BATCH_ENGINE_", "PREFECT_API_"))}
    env.update({"ANTHROPIC_API_KEY": "sk-crash-test", "ANTHROPIC_BASE_URL": base_url, "PYTHONPATH": str(ROOT)})
    if crash_at is not None:
        env[ENV_VAR] = crash_at
    if prefect_api_url is not None:
        env["PREFECT_API_URL"] = prefect_api_url
    return env


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_process(args: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = RUN_TIMEOUT_S) -> Finished:
    """Run a command in a session of its own; on timeout (or any error) kill that session, by its id."""
    process = subprocess.Popen(
        list(args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return Finished(process.returncode, stdout, stderr)


# Workers are forked from a server process that imported the engine once (see crash_driver.py).
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["tests.support.crash_driver"])
# Reading a worker's exit code consumes it from the forkserver's pipe, and `Process.start()` polls every other
# live worker: done from two threads at once, one of them reads EOF and reports 255. So both happen under this.
_EXIT_CODES = threading.Lock()


def _exit_code(worker: multiprocessing.process.BaseProcess, timeout: float | None) -> int | None:
    multiprocessing.connection.wait([worker.sentinel], timeout)
    with _EXIT_CODES:
        return worker.exitcode


def run_driver(cwd: Path, base_url: str, args: Sequence[str], crash_at: str | None = None) -> Finished:
    """`crash_driver.py ARGS` in its own process against `base_url`, armed to die at `crash_at`."""
    from tests.support.crash_driver import forked

    out, err = (cwd / f".driver-{time.monotonic_ns()}.{name}" for name in ("out", "err"))
    env = engine_env(base_url)
    worker = _FORKSERVER.Process(target=forked, args=(list(args), str(cwd), env, crash_at or "", str(out), str(err)))
    with _EXIT_CODES:
        worker.start()
    code = _exit_code(worker, RUN_TIMEOUT_S)
    if code is None:
        worker.kill()
        code = _exit_code(worker, None)
    assert code is not None
    stdout, stderr = out.read_text(), err.read_text()
    out.unlink()
    err.unlink()
    return Finished(code, stdout, stderr)


def run_driver_process(
    cwd: Path, base_url: str, args: Sequence[str], crash_at: str | None = None, prefect_api_url: str | None = None
) -> Finished:
    """`python tests/support/crash_driver.py ARGS` as a plain subprocess (pays the engine's import every time); with
    `prefect_api_url`, `batch-engine run` runs the flow on that server (a run then takes longer: Prefect's
    import, and a round trip to its server per task run)."""
    env = engine_env(base_url, crash_at, prefect_api_url)
    timeout = RUN_TIMEOUT_S if prefect_api_url is None else 2 * RUN_TIMEOUT_S
    return run_process([sys.executable, str(DRIVER), *args], env, cwd, timeout)


async def _batches(base_url: str, with_ids: bool) -> list[tuple[BatchInfo, set[str]]]:
    client = make_client(ApiSettings(SecretStr("sk-crash-test"), base_url))
    try:
        found = []
        for info in await list_batches(client, created_after=0):
            ids: set[str] = set()
            if with_ids and info.status == "ended":
                ids = {row.custom_id async for row in batch_results(client, info.id)}
            found.append((info, ids))
        return found
    finally:
        await client.close()


def emulator_batches(base_url: str, *, with_ids: bool = True) -> list[tuple[BatchInfo, set[str]]]:
    """Every batch the emulator holds, and the custom_ids in its results (empty while it runs)."""
    return asyncio.run(_batches(base_url, with_ids))

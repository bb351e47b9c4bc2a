"""The API key never leaves the process: not in logs (even at DEBUG), output, ledger, usage log, exception
messages or reprs — checked on a full run with faults, by grepping every byte written."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings, RetryPolicy, make_client, translate
from batch_engine.config import load_config
from batch_engine.emulator import EmulatorSettings, start_emulator
from batch_engine.errors import ApiError
from batch_engine.runner import RunOptions, run

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-ant-api03-RECOGNIZABLE-7f3a9c2e5b1d4086-SECRET"
MARKERS = [KEY, KEY[10:30], KEY[-20:]]


def _leaks(data: bytes | str) -> list[str]:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return [marker for marker in MARKERS if marker in text]


def _every_file(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


async def _no_wait(_: float) -> None:
    await asyncio.sleep(0)


def test_a_faulty_run_writes_the_key_nowhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = EmulatorSettings(
        api_key=KEY,
        batch_duration_s=0.1,
        fault_rate_429=0.1,
        fault_rate_500=0.05,
        fault_rate_drop=0.03,
        fault_retry_after_s=0,
        batch_row_error_rate=0.1,
        batch_row_expire_rate=0.05,
    )
    config = load_config(ROOT / "samples" / "config.toml")
    fast = config.model_copy(
        update={"limits": config.limits.model_copy(update={"batch_poll_initial_s": 0.05, "batch_poll_interval_s": 0.1})}
    )
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx's DEBUG logs included
    with start_emulator(settings) as emulator:
        api = ApiSettings(SecretStr(KEY), emulator.base_url)
        summary = asyncio.run(
            run(
                ROOT / "samples" / "nightly_tasks.json",
                tmp_path / "out" / "results.json",
                api=api,
                config=fast,
                options=RunOptions(state_dir=tmp_path / "state"),
                policy=RetryPolicy(attempts=10, sleep=_no_wait),
            )
        )
        # A wrong key: the authentication error, its message and its repr do not echo what was sent.
        wrong = ApiSettings(SecretStr(KEY + "-wrong"), emulator.base_url)

        async def refused() -> ApiError:
            client = make_client(wrong)
            try:
                await client.messages.create(model="claude-haiku-5-5", max_tokens=8, messages=[])
            except Exception as exc:
                return translate(exc)
            finally:
                await client.close()
            raise AssertionError("the emulator accepted a wrong key")

        error = asyncio.run(refused())
    assert summary.counts.total == 304
    assert error.status == 401
    assert not _leaks(str(error)) and not _leaks(repr(error)) and not _leaks(repr(vars(error)))
    assert not _leaks(repr(api)) and not _leaks(str(api))
    written = _every_file(tmp_path)
    assert any(path.name == "results.json" for path in written)
    assert any(path.name == "ledger.sqlite3" for path in written)
    assert any(path.name == "usage.sqlite3" for path in written)
    assert {str(path): _leaks(data) for path, data in written.items() if _leaks(data)} == {}
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records)
    assert caplog.records and not _leaks(logged)


def test_the_cli_prints_no_key_and_no_prompt_text(tmp_path: Path) -> None:
    with start_emulator(EmulatorSettings(api_key=KEY, batch_duration_s=0.1, fault_rate_429=0.2)) as emulator:
        env = {**os.environ, "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": emulator.base_url}
        command = [sys.executable, "-m", "batch_engine.cli", "run", str(ROOT / "samples" / "nightly_tasks.json")]
        command += ["-o", str(tmp_path / "o.json"), "--config", str(ROOT / "samples" / "config.toml")]
        command += ["--state-dir", str(tmp_path / "s"), "--poll-interval", "0.2s"]
        done = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    printed = done.stdout + done.stderr
    assert not _leaks(printed)
    # Prompt contents stay out of what is printed too: no task's input text appears.
    first_task = orjson.loads((ROOT / "samples" / "nightly_tasks.json").read_bytes())[0]
    assert first_task["input_data"]["logs"][:40].encode() not in printed

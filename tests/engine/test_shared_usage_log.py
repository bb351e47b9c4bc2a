"""One history for the team: two runs on two "machines" (their own working and state directories) keep their
usage in one PostgreSQL database, and `cache-stats`, `report` and `plan`'s output estimate (the budget's history)
read both, through `--state-url` or $BATCH_ENGINE_STATE_URL."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from batch_engine.cli import main
from batch_engine.emulator import RunningEmulator
from batch_engine.state.backend import open_ledger
from batch_engine.state.url import ENV_STATE_URL, parse_state_url
from tests.support.engine import write_jsonl


def _tasks(prefix: str, count: int, task_type: str) -> list[dict[str, object]]:
    return [
        {"task_id": f"{prefix}{i}", "task_type": task_type, "input_data": {"text": f"{prefix} {i}"}}
        for i in range(count)
    ]


def test_cache_stats_report_and_plan_read_every_machines_usage_from_the_shared_database(
    emulator: RunningEmulator,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for machine, count, mode in (("a", 6, "--realtime-only"), ("b", 4, "--batch-only")):
        home = tmp_path / machine
        home.mkdir()
        tasks = write_jsonl(home / "tasks.jsonl", _tasks(machine, count, "classify_bulk"))
        args = ["run", str(tasks), "-o", str(home / "out.json"), "--state-dir", str(home / "state"), mode]
        assert main([*args, "--state-url", pg_url, "--no-prefect", "--poll-interval", "0.2s"]) == 0
        assert not (home / "state" / "ledger.sqlite3").exists() and not (home / "state" / "usage.sqlite3").exists()
    with open_ledger(parse_state_url(pg_url)) as ledger:
        assert sorted(run.status for run in ledger.runs()) == ["complete", "complete"]

    capsys.readouterr()
    elsewhere = tmp_path / "c"  # a third machine: no local state at all
    assert main(["cache-stats", "--state-dir", str(elsewhere), "--state-url", pg_url, "--json", "--by", "route"]) == 0
    by_route = {row["group"]: row["requests"] for row in orjson.loads(capsys.readouterr().out)}
    assert by_route == {"realtime": 6, "batch": 4}

    monkeypatch.setenv(ENV_STATE_URL, pg_url)
    assert main(["report", "--state-dir", str(elsewhere), "--analyze-only", "--scope", "batching"]) == 0
    assert capsys.readouterr().out.startswith("# batch_engine optimization report")

    plan_input = write_jsonl(tmp_path / "next.jsonl", _tasks("n", 3, "classify_bulk"))
    assert main(["plan", str(plan_input), "--json", "--state-dir", str(elsewhere)]) == 0
    assert orjson.loads(capsys.readouterr().out)["output_history_task_types"] == ["classify_bulk"]
    assert not elsewhere.exists()

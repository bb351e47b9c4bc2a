"""The public API a Python user imports: `batch_engine.__all__`, pinned, and a run through it alone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import orjson
from pydantic import SecretStr

import batch_engine
from batch_engine.emulator import RunningEmulator
from batch_engine.schema import json_schema
from tests.support.engine import fast_config, generated_tasks, write_jsonl

PUBLIC = [
    # running
    "run",
    "Run",
    "RunOptions",
    "ApiSettings",
    "api_from_environment",
    # config and planning
    "Config",
    "load_config",
    "make_plan",
    "iter_records",
    "RawRecord",
    "Plan",
    "PlannedTask",
    "plan_summary",
    "PlanSummary",
    # models
    "TaskRequest",
    "TaskResult",
    "Rejection",
    "Usage",
    "ErrorInfo",
    "RunSummary",
    "RunCounts",
    "BatchSummary",
    "TokenTotals",
    "CostSummary",
    "OutputFile",
    # the error tree
    "BatchEngineError",
    "InputError",
    "ConfigError",
    "BudgetError",
    "LedgerError",
    "RunBusyError",
    "RunChangedError",
    "ApiError",
    "TransientApiError",
    "PermanentApiError",
    "SpendLimitError",
]


def test_the_public_api_is_exactly_this() -> None:
    assert sorted(batch_engine.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(batch_engine, name) is not None, name


def test_every_error_is_a_batch_engine_error() -> None:
    errors = [getattr(batch_engine, name) for name in PUBLIC if name.endswith("Error")]
    assert all(issubclass(error, batch_engine.BatchEngineError) for error in errors)


def test_importing_the_package_loads_neither_the_sdk_nor_the_run_loop() -> None:
    # The CLI's quick commands and the emulator import `batch_engine.*`, which runs `batch_engine/__init__.py`.
    code = "import sys, batch_engine.config; print(sorted({'anthropic', 'batch_engine.runner'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_task_file_runs_through_the_public_api_alone(emulator: RunningEmulator, tmp_path: Path) -> None:
    tasks = generated_tasks(6, realtime_every=2)
    source = write_jsonl(tmp_path / "tasks.jsonl", [*tasks, {"task_id": "bad", "task_type": "nope"}])
    config = fast_config()
    plan = batch_engine.make_plan(batch_engine.iter_records(source), config, datetime.now(UTC))
    assert (len(plan.tasks), [r.field for r in plan.rejections]) == (6, ["task_type"])
    summary_before = batch_engine.plan_summary(plan, config)
    assert (summary_before.tasks, summary_before.rejected, summary_before.by_route) == (
        6,
        1,
        {"batch": 3, "realtime": 3},
    )

    summary = asyncio.run(
        batch_engine.run(
            source,
            tmp_path / "out.json",
            api=batch_engine.ApiSettings(SecretStr("sk-test"), emulator.base_url),
            config=config,
            options=batch_engine.RunOptions(state_dir=tmp_path / "state"),
        )
    )

    assert isinstance(summary.counts, batch_engine.RunCounts)
    assert (summary.counts.total, summary.counts.succeeded, summary.counts.rejected) == (7, 6, 1)
    written = orjson.loads((tmp_path / "out.json").read_bytes())
    # The published schema describes the whole file, `run` included, and the file is what the model reads back.
    jsonschema.validate(written, json_schema("output"))
    assert batch_engine.OutputFile.model_validate(written).run == summary


def test_the_published_output_schema_describes_the_run_section() -> None:
    schema = json_schema("output")
    assert schema["properties"]["run"] == {"$ref": "#/$defs/RunSummary"}
    run = schema["$defs"]["RunSummary"]
    assert run["properties"]["counts"] == {"$ref": "#/$defs/RunCounts"}
    assert set(schema["$defs"]["RunCounts"]["required"]) == {"total", "succeeded", "failed", "rejected"}
    assert {"batches", "tokens", "cost", "cache_hit_rate", "durations_s"} <= set(run["required"])

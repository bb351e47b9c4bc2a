"""Structured outputs end to end: the real SDK against the emulator, both lanes, invalid answers retried and
counted, and schemas the API would refuse refused (by the engine up front, by the emulator with a 400)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import orjson
import pytest
from pydantic import SecretStr

from batch_engine.cli import main
from batch_engine.client import ApiSettings
from batch_engine.config import default_config_text, load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.render.advice_markdown import render_report
from batch_engine.runner import RunOptions, run
from batch_engine.state.usage_log import UsageLog
from batch_engine.telemetry.advice import analyze
from tests.support.engine import ROOT, SAMPLE_CONFIG, fast_config, messages_calls, run_engine, write_jsonl

INVOICES = ROOT / "samples" / "invoices.jsonl"
CONFIG = load_config(SAMPLE_CONFIG)
SCHEMA = CONFIG.task_types["extract_invoice"].output_schema
REALTIME_INVOICES = 3  # samples/invoices.jsonl: every 8th of 24 is mode=realtime


def test_a_schema_task_type_runs_end_to_end_in_both_lanes(emulator: RunningEmulator, tmp_path: Path) -> None:
    output = run_engine(emulator, INVOICES, tmp_path, config=fast_config(CONFIG))
    assert {row["route"] for row in output.rows} == {"batch", "realtime"}
    assert output.run["counts"]["invalid_output"] == 0
    for row in output.rows:
        assert row["status"] == "succeeded", row["error"]
        jsonschema.validate(row["parsed"], SCHEMA)  # an independent validator agrees
        assert row["parsed"] == orjson.loads(row["text"])
        assert row["output_retries"] == 0
    assert output.summary.all_succeeded


def test_invalid_answers_are_retried_once_realtime_and_their_cost_counted(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    emulator.configure(invalid_output_rate=1.0)
    output = run_engine(emulator, INVOICES, tmp_path, config=fast_config(CONFIG))
    assert output.run["counts"]["invalid_output"] == 24
    assert output.run["counts"]["by_status"] == {"invalid_output": 24}
    assert not output.summary.all_succeeded  # the CLI exits 1
    for row in output.rows:
        assert row["status"] == "invalid_output" and row["parsed"] is None
        assert row["output_retries"] == 1 and row["attempts"] == 2
        assert row["route"] == "realtime"  # the retry went realtime
        assert row["error"]["type"] == "invalid_output"
        assert row["error"]["message"].startswith("does not match the output schema: $: missing required property")
    # Every request was billed and every one is in the output: first answers (21 batch, 3 realtime) + 24 retries.
    assert messages_calls(emulator.stats()) == {"200": REALTIME_INVOICES + 24}
    billed = emulator.stats()["cost_usd"]
    assert billed["batch"] > 0
    assert output.run["cost"]["total_usd"] == pytest.approx(billed["total"], abs=1e-6)
    usage = UsageLog.open(tmp_path / "state")
    try:
        records = usage.records()
    finally:
        usage.close()
    assert [r.status for r in records].count("invalid_output") == 48
    report = render_report(analyze(records, CONFIG, now=time.time()))
    section = report.split("answers that did not match their output schema (invalid_output)\n", 1)[1]
    assert "| extract_invoice | 48 |" in section.split("\n## ", 1)[0]


def test_a_retry_that_validates_makes_the_row_succeed(emulator: RunningEmulator, tmp_path: Path) -> None:
    emulator.configure(invalid_output_rate=0.5, seed=7)
    output = run_engine(emulator, INVOICES, tmp_path, config=fast_config(CONFIG))
    recovered = [row for row in output.rows if row["status"] == "succeeded" and row["output_retries"] == 1]
    assert recovered, "with half the answers invalid, some retries should have validated"
    for row in recovered:
        jsonschema.validate(row["parsed"], SCHEMA)
    retries = sum(row["output_retries"] for row in output.rows)
    assert messages_calls(emulator.stats()) == {"200": REALTIME_INVOICES + retries}
    assert output.run["cost"]["total_usd"] == pytest.approx(emulator.stats()["cost_usd"]["total"], abs=1e-6)
    assert output.run["counts"]["invalid_output"] == sum(row["status"] == "invalid_output" for row in output.rows)


def test_no_retry_when_the_config_says_none(emulator: RunningEmulator, tmp_path: Path) -> None:
    emulator.configure(invalid_output_rate=1.0)
    output = run_engine(emulator, INVOICES, tmp_path, config=fast_config(CONFIG, invalid_output_retries=0))
    assert {row["output_retries"] for row in output.rows} == {0}
    assert messages_calls(emulator.stats()) == {"200": REALTIME_INVOICES}


def test_parsed_only_writes_one_line_per_task_with_its_parsed_value(emulator: RunningEmulator, tmp_path: Path) -> None:
    tasks = [orjson.loads(line) for line in INVOICES.read_bytes().splitlines()[:4]]
    tasks.append({"task_id": "not-a-schema-task", "task_type": "summarize", "input_data": {"document": "x"}})
    path = write_jsonl(tmp_path / "in.jsonl", tasks)
    options = RunOptions(state_dir=tmp_path / "state", output_format="parsed-jsonl")
    out = tmp_path / "out.jsonl"
    asyncio.run(
        run(path, out, api=ApiSettings(SecretStr("k"), emulator.base_url), config=fast_config(CONFIG), options=options)
    )
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["task_id"] for line in lines] == [task["task_id"] for task in tasks]
    assert all(set(line) == {"task_id", "status", "parsed"} for line in lines)
    for line in lines[:4]:
        jsonschema.validate(line["parsed"], SCHEMA)
    assert lines[4] == {"task_id": "not-a-schema-task", "status": "succeeded", "parsed": None}


def test_a_model_without_structured_outputs_is_asked_through_a_forced_tool(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # Both sides serve the same model table, with structured outputs off for Haiku 4.5: the emulator then refuses
    # output_config.format on it, so every row that validates proves the engine asked through the tool instead.
    # (Haiku 4.5: it does not think unless asked, and thinking rules a forced tool out.)
    text = default_config_text()
    start = text.index("[models.claude-haiku-4-5]")
    text = text[:start] + text[start:].replace("structured_outputs = true", "structured_outputs = false", 1)
    config_path = tmp_path / "no-so.toml"
    config_path.write_text(text)
    emulator.configure(config_path=config_path)
    config = load_config(config_path)
    tasks = [orjson.loads(line) | {"model": "claude-haiku-4-5"} for line in INVOICES.read_bytes().splitlines()[:9]]
    output = run_engine(emulator, write_jsonl(tmp_path / "in.jsonl", tasks), tmp_path, config=fast_config(config))
    assert {row["route"] for row in output.rows} == {"batch", "realtime"}
    for row in output.rows:
        assert row["status"] == "succeeded", row["error"]
        (block,) = [b for b in row["content"] if b["type"] == "tool_use"]
        assert block["name"] == "emit_result" and row["parsed"] == block["input"]
        jsonschema.validate(row["parsed"], config.task_types["extract_invoice"].output_schema)


def test_a_schema_the_api_would_refuse_stops_the_run_before_anything_is_sent(
    emulator: RunningEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        default_config_text()
        + '\n[task_types.score]\nmode = "batch"\nuser = "{q}"\n'
        + 'output_schema = { type = "object", properties = { n = { type = "integer", maximum = 10 } } }\n'
    )
    tasks = write_jsonl(tmp_path / "in.jsonl", [{"task_id": "a", "task_type": "score", "input_data": {"q": "?"}}])
    code = main(["run", str(tasks), "-o", str(tmp_path / "out.json"), "--config", str(config), "--emulate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"Error: {config}: task_types.score.output_schema: the API would refuse this schema: "
        "/properties/n/maximum: numerical constraints are not supported by structured outputs"
    ]
    assert emulator.stats()["calls"] == {}


# --- the emulator, as the API: 400s for schemas it does not accept, answers that validate -------------------


@pytest.fixture
def client(emulator: RunningEmulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="k", base_url=emulator.base_url, max_retries=0)


def _create(client: anthropic.Anthropic, schema: Any, model: str = "claude-haiku-5-5", **extra: Any) -> Any:
    return client.messages.create(
        model=model,
        max_tokens=500,
        messages=[{"role": "user", "content": "extract"}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        # Haiku 5.5 thinks by default (issue #15): off unless a test asks, so the answer is the only block.
        **({"thinking": {"type": "disabled"}} if model == "claude-haiku-5-5" else {}) | extra,
    )


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}, "'minimum' is not supported"),
        ({"type": "string", "minLength": 2}, "'minLength' is not supported"),
        ({"type": "array", "minItems": 3}, "minItems: only 0 and 1 are supported"),
        ({"type": "object", "additionalProperties": True}, "additionalProperties: must be false"),
        ({"enum": [[1]]}, "only strings, numbers, booleans and nulls"),
        ({"$ref": "http://example.com/x.json"}, "external $ref is not supported"),
        ({"$defs": {"a": {"properties": {"b": {"$ref": "#/$defs/a"}}}}, "$ref": "#/$defs/a"}, "Too many recursive"),
        ({"type": "string", "format": "phone"}, "string format 'phone' is not supported"),
        ({"type": "string", "pattern": "(a)\\1"}, "backreferences"),
    ],
)
def test_the_emulator_answers_400_for_schemas_the_api_does_not_accept(
    client: anthropic.Anthropic, schema: dict[str, Any], message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        _create(client, schema)
    assert message in str(caught.value)


def test_the_emulator_refuses_output_format_on_a_model_without_structured_outputs(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="structured outputs are not supported on the model"):
        _create(client, {"type": "object"}, model="claude-fable-5-1")


def test_the_emulators_answers_validate_against_the_schema(client: anthropic.Anthropic) -> None:
    assert SCHEMA is not None
    reply = _create(client, SCHEMA)
    (block,) = reply.content
    jsonschema.validate(orjson.loads(block.text), SCHEMA, format_checker=jsonschema.FormatChecker())
    # With thinking too: the grammar applies to the final text only.
    thinking = _create(client, SCHEMA, thinking={"type": "adaptive"})
    texts = [b.text for b in thinking.content if b.type == "text"]
    jsonschema.validate(orjson.loads(texts[0]), SCHEMA)


def test_the_emulator_injects_invalid_answers_at_the_configured_rate(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    assert SCHEMA is not None
    emulator.configure(invalid_output_rate=0.5, seed=3)
    valid = 0
    for _ in range(40):
        text = _create(client, SCHEMA).content[0].text
        try:
            jsonschema.validate(orjson.loads(text), SCHEMA)
        except (jsonschema.ValidationError, orjson.JSONDecodeError):
            continue
        valid += 1
    assert 8 <= valid <= 32


def test_the_invalid_output_rate_is_documented_in_the_emulator_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["emulator", "--help"])
    assert "--invalid-output-rate F" in capsys.readouterr().out


def test_plan_of_the_samples_says_how_the_schema_is_requested(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(INVOICES), "--config", str(SAMPLE_CONFIG)]) == 0
    assert "schema:  extract_invoice: structured outputs (output_config.format) on claude-haiku-5-5" in (
        capsys.readouterr().out
    )


def test_the_prefect_flow_asks_again_as_often_as_the_config_says(
    prefect_harness: None, emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `batch-engine run` runs this flow: its leftovers phase must repeat while answers have retries left.
    from batch_engine.orchestration.orchestrator import batch_orchestrator

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    emulator.configure(invalid_output_rate=1.0)
    config = tmp_path / "config.toml"
    config.write_text(SAMPLE_CONFIG.read_text().replace("[limits]\n", "[limits]\ninvalid_output_retries = 2\n", 1))
    tasks = write_jsonl(tmp_path / "in.jsonl", [orjson.loads(line) for line in INVOICES.read_bytes().splitlines()[:8]])

    async def go() -> Any:
        return await batch_orchestrator(
            input_path=str(tasks),
            output_path=str(tmp_path / "out.json"),
            config_path=str(config),
            state_dir=str(tmp_path / "state"),
            poll_interval_s=0.2,
        )

    summary = asyncio.run(go())
    rows = orjson.loads((tmp_path / "out.json").read_bytes())["results"]
    assert not summary.all_succeeded and summary.counts.invalid_output == 8
    assert [(row["status"], row["output_retries"], row["attempts"]) for row in rows] == [("invalid_output", 2, 3)] * 8
    assert messages_calls(emulator.stats()) == {"200": 1 + 2 * 8}  # one realtime task, then two rounds of eight
    assert summary.cost.total_usd == pytest.approx(emulator.stats()["cost_usd"]["total"], abs=1e-6)


def test_parsed_only_needs_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(INVOICES), "-o", str(tmp_path / "o.json"), "--parsed-only", "--emulate"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "Error: --parsed-only needs --format jsonl"

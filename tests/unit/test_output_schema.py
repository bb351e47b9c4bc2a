"""Output schemas, pure: what the API's structured outputs accept, how a task type's schema is requested on each
model, and the compiled validator (checked against the `jsonschema` library as an independent oracle)."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from batch_engine.config import Config, default_config_text, load_config, parse_config
from batch_engine.errors import ConfigError
from batch_engine.files import RawRecord
from batch_engine.planning import make_plan
from batch_engine.planning.run_summary import encode_output
from batch_engine.structured_output import OutputSpec, SchemaError, check_schema, closed

NOW = datetime(2026, 12, 1, tzinfo=UTC)
INVOICE = load_config().task_types["extract_invoice"].output_schema
assert INVOICE is not None


def plan_of(config: Config, *records: dict[str, Any]):  # type: ignore[no-untyped-def]
    return make_plan([RawRecord(index=i, line=i + 1, value=r) for i, r in enumerate(records)], config, NOW)


def config_with(task_type_toml: str) -> Config:
    """The default config plus one task type, parsed like a config file."""
    return parse_config(default_config_text() + "\n" + textwrap.dedent(task_type_toml), "test.toml")


def _replace_key(text: str, model: str, key: str, value: str) -> str:
    start = text.index(f"[models.{model}]")
    line_start = text.index(f"\n{key} = ", start) + 1
    line_end = text.index("\n", line_start)
    return text[:line_start] + f"{key} = {value}" + text[line_end:]


def config_for(model_settings: dict[str, dict[str, str]], task_type_toml: str) -> Config:
    """As `config_with`, with some model settings changed."""
    text = default_config_text()
    for model, changes in model_settings.items():
        for key, value in changes.items():
            text = _replace_key(text, model, key, value)
    return parse_config(text + "\n" + textwrap.dedent(task_type_toml), "test.toml")


TASK_TYPE_X = """
[task_types.x]
mode = "batch"
tier = "cheap"
user = "{q}"
output_schema = { type = "object", required = ["a"], properties = { a = { type = "string" } } }
"""


# --- what the API accepts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "path", "reason"),
    [
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}, "/properties/n/minimum", "numer"),
        ({"type": "string", "maxLength": 5}, "/maxLength", "string length"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 2}, "/minItems", "minItems 0 or 1"),
        ({"type": "array", "maxItems": 3}, "/maxItems", "array constraints"),
        ({"type": "object", "additionalProperties": True}, "/additionalProperties", "must be false"),
        ({"type": "object", "additionalProperties": {"type": "string"}}, "/additionalProperties", "must be false"),
        ({"enum": [{"a": 1}]}, "/enum", "complex types"),
        ({"$ref": "https://example.com/s.json"}, "/$ref", "external"),
        (
            {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
            "/$defs/n/properties/next/$ref",
            "recursive",
        ),
        ({"type": "string", "format": "credit-card"}, "/format", "not supported"),
        ({"oneOf": [{"type": "string"}]}, "/oneOf", "anyOf"),
        ({"type": "object", "patternProperties": {"^a": {}}}, "/patternProperties", "patternProperties"),
        ({"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"type": "string"}}}, "/allOf/0", "allOf with $ref"),
    ],
)
def test_a_schema_the_api_would_refuse_is_refused_with_the_reason(
    schema: dict[str, Any], path: str, reason: str
) -> None:
    with pytest.raises(SchemaError) as caught:
        check_schema(schema)
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_the_documented_features_are_accepted() -> None:
    check_schema(INVOICE)
    check_schema(
        {
            "$defs": {"v": {"type": "object", "properties": {"n": {"type": "string"}}, "additionalProperties": False}},
            "type": "object",
            "properties": {
                "v": {"$ref": "#/$defs/v"},
                "c": {"const": "x"},
                "e": {"enum": ["a", 1, True, None]},
                "u": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "all": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}}]},
                "d": {"type": "string", "format": "date-time", "default": "2026-01-01T00:00:00Z"},
                "l": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                "p": {"type": "string", "pattern": "^[A-Z]{3}$"},
            },
            "required": ["v"],
            "additionalProperties": False,
        }
    )


def test_objects_are_closed_as_the_api_requires() -> None:
    schema = closed({"type": "object", "properties": {"v": {"type": "object", "properties": {}}}})
    assert schema["additionalProperties"] is False
    assert schema["properties"]["v"]["additionalProperties"] is False


# --- config: inline, file, pydantic model --------------------------------------------------------------------


def test_a_config_with_a_schema_the_api_would_refuse_is_one_error_naming_the_key_and_the_reason() -> None:
    bad = TASK_TYPE_X.replace('a = { type = "string" }', 'a = { type = "integer", minimum = 0 }')
    with pytest.raises(ConfigError) as caught:
        config_with(bad)
    message = str(caught.value)
    assert "task_types.x.output_schema" in message
    assert "/properties/a/minimum" in message and "numerical constraints are not supported" in message
    assert "\n" not in message


def test_a_schema_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "ticket.json").write_bytes(
        orjson.dumps({"type": "object", "properties": {"label": {"enum": ["bug", "other"]}}, "required": ["label"]})
    )
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        default_config_text()
        + '\n[task_types.x]\nmode = "batch"\nuser = "{q}"\noutput_schema_file = "schemas/ticket.json"\n'
    )
    schema = load_config(config_file).task_types["x"].output_schema
    assert schema is not None and schema["properties"]["label"] == {"enum": ["bug", "other"]}
    assert schema["additionalProperties"] is False
    (tmp_path / "schemas" / "ticket.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"output_schema_file: .*ticket.json is not JSON"):
        load_config(config_file)


def test_a_pydantic_model_gives_the_schema_and_its_constraints_are_refused() -> None:
    toml = '[task_types.x]\nmode = "batch"\nuser = "{q}"\noutput_schema_model = "tests.support.schema_models:Ticket"\n'
    schema = config_with(toml).task_types["x"].output_schema
    assert schema is not None
    spec = OutputSpec.of(schema, "output_config")
    good = {"label": "bug", "vendor": {"name": "A", "country": "DE"}, "tags": [], "note": None}
    assert spec.validate(good, "$") is None
    assert spec.validate({**good, "extra": 1}, "$") == "$: unexpected property 'extra'"
    with pytest.raises(ConfigError, match=r"output_schema_model: .*/properties/score/(maximum|minimum)"):
        config_with(toml.replace("Ticket", "Scored"))
    with pytest.raises(ConfigError, match=r"cannot import tests\.support\.schema_models:Nope"):
        config_with(toml.replace("Ticket", "Nope"))


# --- the form each model gets ----------------------------------------------------------------------------------


def test_structured_outputs_where_the_model_supports_them() -> None:
    plan = plan_of(config_with(TASK_TYPE_X), {"task_id": "a", "task_type": "x", "input_data": {"q": "hi"}})
    (task,) = plan.tasks
    assert task.output is not None and task.output.form == "output_config"
    assert task.params["output_config"]["format"] == {"type": "json_schema", "schema": task.output.schema}


def test_a_model_without_structured_outputs_gets_a_forced_tool_when_it_accepts_one() -> None:
    config = config_for({"claude-haiku-5-5": {"structured_outputs": "false"}}, TASK_TYPE_X)
    (task,) = plan_of(config, {"task_id": "a", "task_type": "x", "input_data": {"q": "hi"}}).tasks
    assert task.output is not None and task.output.form == "tool"
    assert "output_config" not in task.params
    assert task.params["tool_choice"] == {"type": "tool", "name": "emit_result"}
    assert task.params["tools"][0]["input_schema"] == task.output.schema


def test_a_model_that_accepts_neither_gets_the_schema_in_its_system_prompt() -> None:
    # Fable 5.1: no structured outputs, and a forced tool_choice returns 400 on it.
    toml = TASK_TYPE_X.replace('tier = "cheap"', 'tier = "cheap"\nmax_tokens = 512')
    (task,) = plan_of(
        config_with(toml), {"task_id": "a", "task_type": "x", "model": "claude-fable-5-1", "input_data": {"q": "hi"}}
    ).tasks
    assert task.output is not None and task.output.form == "prompt"
    # Fable cannot turn thinking off: output_config carries the lowest effort (issue #15), never a format.
    assert "tools" not in task.params and "format" not in task.params.get("output_config", {})
    assert "must validate against this JSON Schema" in task.params["system"][0]["text"]


def test_thinking_rules_out_the_forced_tool() -> None:
    toml = TASK_TYPE_X + 'thinking = { mode = "adaptive", effort = "low" }\n'
    config = config_for({"claude-haiku-5-5": {"structured_outputs": "false"}}, toml)
    (task,) = plan_of(config, {"task_id": "a", "task_type": "x", "input_data": {"q": "hi"}}).tasks
    assert task.output is not None and task.output.form == "prompt"


def test_structured_outputs_keep_the_effort_of_adaptive_thinking() -> None:
    toml = TASK_TYPE_X + 'thinking = { mode = "adaptive", effort = "low" }\n'
    (task,) = plan_of(config_with(toml), {"task_id": "a", "task_type": "x", "input_data": {"q": "hi"}}).tasks
    assert task.params["output_config"]["effort"] == "low"
    assert task.params["output_config"]["format"]["type"] == "json_schema"


def test_raw_params_may_carry_the_apis_own_output_format() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    params = {
        "messages": [{"role": "user", "content": "hi"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    refused = {"type": "object", "properties": {"n": {"type": "number", "maximum": 1}}}
    plan = plan_of(
        load_config(),
        {"task_id": "a", "task_type": "summarize", "params": params},
        {
            "task_id": "b",
            "task_type": "summarize",
            "params": {**params, "output_config": {"format": {"type": "json_schema", "schema": refused}}},
        },
        {"task_id": "c", "task_type": "summarize", "model": "claude-fable-5-1", "params": params},
    )
    (task,) = plan.tasks
    assert task.output is not None and task.output.schema == schema
    lines = [rejection.one_line() for rejection in plan.rejections]
    assert lines == [
        "line 2 (task_id b): params.output_config.format.schema.properties.n.maximum: the API would refuse it: "
        "numerical constraints are not supported by structured outputs",
        "line 3 (task_id c): params.output_config.format: claude-fable-5-1 does not support structured outputs "
        "(see [models.claude-fable-5-1])",
    ]


def test_plan_says_which_form_each_task_type_gets() -> None:
    from batch_engine.planning.plan_summary import plan_summary, render_plan_summary

    plan = plan_of(
        config_with(TASK_TYPE_X),
        {"task_id": "a", "task_type": "x", "input_data": {"q": "1"}},
        {"task_id": "b", "task_type": "x", "model": "claude-fable-5-1", "input_data": {"q": "2"}},
    )
    summary = plan_summary(plan, config_with(TASK_TYPE_X))
    assert summary.output_schemas == {
        "x": [
            "schema in the system prompt (fallback) on claude-fable-5-1",
            "structured outputs (output_config.format) on claude-haiku-5-5",
        ]
    }
    assert "schema:  x: schema in the system prompt (fallback) on claude-fable-5-1, structured outputs" in (
        render_plan_summary(summary)
    )


# --- answers ---------------------------------------------------------------------------------------------------


def test_an_answer_that_does_not_parse_or_validate_gives_a_one_line_reason() -> None:
    spec = OutputSpec.of(INVOICE, "output_config")
    prose = spec.parse([], "Sure! Here it is.")
    assert prose[0] is None and prose[1] is not None
    assert prose[1].startswith("the answer is not JSON (") and prose[1].endswith(': "Sure! Here it is."')
    missing = spec.parse([], '{"invoice_number": "1"}')[1]
    assert missing == "does not match the output schema: $: missing required property 'issue_date'"
    assert spec.parse([], "")[1] == "the answer has no text"


def test_the_prompt_form_takes_an_answer_in_a_code_fence() -> None:
    spec = OutputSpec.of({"type": "object", "properties": {"a": {"type": "integer"}}}, "prompt")
    assert spec.parse([], '```json\n{"a": 1}\n```') == ({"a": 1}, None)


def test_the_tool_form_reads_the_tool_input() -> None:
    spec = OutputSpec.of({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "tool")
    content = [{"type": "tool_use", "id": "t", "name": "emit_result", "input": {"a": 2}}]
    assert spec.parse(content, "") == ({"a": 2}, None)
    assert spec.parse([], "")[1] == "no emit_result tool call in the answer"


# The compiled validator against the jsonschema library, on values near the schema (valid ones and ones wrong in
# one place) and on arbitrary JSON.
ORACLE_SCHEMAS = [
    INVOICE,
    {
        "$defs": {"item": {"type": "object", "properties": {"k": {"enum": ["a", 1, None]}}, "required": ["k"]}},
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1},
            "u": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^x"}]},
            "c": {"const": 1},
            "both": {"allOf": [{"type": "object", "required": ["a"]}, {"properties": {"a": {"type": "boolean"}}}]},
        },
        "required": ["items"],
        "additionalProperties": False,
    },
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


def near(schema: Any, root: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped by `schema`, each part sometimes replaced by arbitrary JSON."""
    if not isinstance(schema, dict) or depth > 6:
        return JSON
    if "$ref" in schema:
        return near(root["$defs"][schema["$ref"].rsplit("/", 1)[1]], root, depth + 1)
    options: list[st.SearchStrategy[Any]] = [JSON]
    if "enum" in schema:
        options.append(st.sampled_from(schema["enum"]))
    if "const" in schema:
        options.append(st.just(schema["const"]))
    for branch in schema.get("anyOf", []) + schema.get("allOf", []):
        options.append(near(branch, root, depth + 1))
    kinds = schema.get("type")
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind == "object" or "properties" in schema:
            props = {name: near(sub, root, depth + 1) for name, sub in schema.get("properties", {}).items()}
            required = {name: strategy for name, strategy in props.items() if name in schema.get("required", [])}
            rest = {name: strategy for name, strategy in props.items() if name not in required}
            options.append(st.fixed_dictionaries(required, optional=rest))
            options.append(st.fixed_dictionaries({}, optional=props | {"zz": JSON}))
        elif kind == "array":
            options.append(st.lists(near(schema.get("items"), root, depth + 1), max_size=3))
        elif kind == "string":
            options.append(st.sampled_from(["2026-01-01", "x1", "abc", ""]))
        elif kind in ("integer", "number"):
            options.append(st.integers(-3, 3) | st.floats(-2, 2, allow_nan=False))
        elif kind == "boolean":
            options.append(st.booleans())
    return st.one_of(options)


@pytest.mark.parametrize("schema", ORACLE_SCHEMAS, ids=["invoice", "refs-anyof-allof"])
def test_the_validator_agrees_with_jsonschema(schema: dict[str, Any]) -> None:
    oracle = jsonschema.Draft202012Validator(schema)
    check = OutputSpec.of(schema, "output_config").validate

    @settings(max_examples=400, deadline=None)
    @given(near(schema, schema))
    def agree(value: Any) -> None:
        assert (check(value, "$") is None) == oracle.is_valid(value), value

    agree()


def test_parsed_only_lines_carry_the_task_id_the_status_and_the_parsed_value() -> None:
    from batch_engine.models import TaskResult

    rows = [
        TaskResult(task_id="a", index=0, status="succeeded", parsed={"x": 1}, text='{"x": 1}'),
        TaskResult(task_id="b", index=1, status="invalid_output", text="prose"),
    ]
    lines = b"".join(encode_output(None, rows, "parsed-jsonl")).splitlines()  # type: ignore[arg-type]
    assert [orjson.loads(line) for line in lines] == [
        {"task_id": "a", "status": "succeeded", "parsed": {"x": 1}},
        {"task_id": "b", "status": "invalid_output", "parsed": None},
    ]


def test_the_run_artifacts_list_invalid_outputs_among_the_failures() -> None:
    from batch_engine.models import ErrorInfo, TaskResult
    from batch_engine.render.artifacts import RunBreakdown

    error = ErrorInfo(
        type="invalid_output", message="does not match the output schema: $: missing required property 'a'"
    )
    rows = [
        TaskResult(task_id="a", index=0, status="succeeded", task_type="x", route="batch", parsed={"a": "1"}),
        TaskResult(task_id="b", index=1, status="invalid_output", task_type="x", route="realtime", error=error),
        TaskResult(task_id="c", index=2, status="invalid_output", task_type="x", route="realtime", error=error),
    ]
    (failure,) = RunBreakdown.of(rows).failures()
    assert (failure.status, failure.error_type, failure.count) == ("invalid_output", "invalid_output", 2)
    assert list(failure.examples) == ["b", "c"]


def test_the_output_json_schema_describes_parsed() -> None:
    from batch_engine.schema import json_schema

    row = json_schema("output")["$defs"]["TaskResult"]["properties"]
    assert "validated against the schema" in row["parsed"]["description"]
    assert "invalid_output" in row["status"]["enum"]


def test_raw_params_with_an_output_config_that_is_not_an_object_are_rejected() -> None:
    params = {"messages": [{"role": "user", "content": "hi"}], "output_config": "json"}
    plan = plan_of(load_config(), {"task_id": "a", "task_type": "summarize", "params": params})
    assert [r.one_line() for r in plan.rejections] == [
        "line 1 (task_id a): params.output_config: expected an object (the API rejects anything else)"
    ]


KEYWORDS = [
    *("type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "allOf"),
    *("$ref", "$defs", "format", "minItems", "pattern", "minimum", "a", "#/$defs/a", "string", "object", "array"),
]
SCHEMA_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers(-1, 3) | st.sampled_from(KEYWORDS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYWORDS), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(JSON | SCHEMA_LIKE)
@example({"type": [[]]})
@example({"format": {}})
@example({"type": "string", "pattern": "("})
@example({"minItems": True})
def test_any_json_as_a_schema_is_accepted_or_refused_with_a_reason_never_a_traceback(schema: Any) -> None:
    nested = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    for candidate in (schema, nested, {"anyOf": [schema]}, {"type": "string", "pattern": schema}):
        try:
            check_schema(candidate)
        except SchemaError as exc:
            assert exc.reason and "\n" not in str(exc)
            continue
        OutputSpec.of(candidate, "output_config").validate({"a": 1}, "$")


def test_an_integer_beyond_64_bits_is_judged_not_raised() -> None:
    # Found by the test above: JSON allows any integer, but orjson writes only 64-bit ones, and the message of the
    # error naming the value raised TypeError instead.
    schema = ORACLE_SCHEMAS[1]
    value = {"items": [{"k": -(2**63) - 1}]}
    error = OutputSpec.of(schema, "output_config").validate(value, "$")
    assert (error is None) == jsonschema.Draft202012Validator(schema).is_valid(value)
    assert error is None or "-9223372036854775809" in error

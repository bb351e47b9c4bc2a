"""Pure: output schemas — which JSON Schemas the API's structured outputs accept, the form a request takes on a
given model, and a validator compiled once per schema that turns an answer into `parsed` or a one-line error.

API facts, from the structured-outputs page (platform.claude.com/docs/en/build-with-claude/structured-outputs,
stored snapshots of late 2025 to 2026; "SO" below):
- The request carries `output_config: {"format": {"type": "json_schema", "schema": {...}}}`; the answer is the
  JSON text of the message's text block. It works with batches, streaming, token counting, thinking (the grammar
  applies to the final text only, not to thinking blocks) and tools; it is incompatible with citations and with
  assistant prefill (SO "Feature compatibility").
- Schemas with an unsupported feature get a 400 (SO "JSON Schema limitations"): supported are the basic types,
  `enum` of primitives, `const`, `anyOf`, `allOf` (not with `$ref`), local `$ref`/`$defs`/`definitions`,
  `default`, `required`, `additionalProperties: false`, the string formats below, and array `minItems` 0 or 1.
  Not supported: recursive schemas, complex types in enums, external `$ref`, numeric constraints (`minimum`, …),
  string length constraints, array constraints beyond `minItems` 0/1, and `additionalProperties` other than false.
- Even so an answer may not validate: `stop_reason` `refusal` or `max_tokens` (SO "Invalid outputs"). So every
  answer is validated here, whatever form the request took.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

# How a task type's schema reaches the model (`plan` prints it):
# - "output_config": the API's structured outputs (constrained decoding), on models that support them;
# - "tool": one tool whose input_schema is the schema, forced with tool_choice; only on models that accept a forced
#   tool_choice, and never with thinking (the API refuses forced tool use with thinking; reference §6);
# - "prompt": the schema in the system prompt, for models that accept neither (answers are validated all the same).
OutputForm = Literal["output_config", "tool", "prompt"]
TOOL_NAME = "emit_result"

# SO "Supported features": string formats.
STRING_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"}
)
TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
# Keywords that only annotate; accepted and ignored by validation.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id"})
_STRUCTURE = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "allOf",
     "$ref", "$defs", "definitions", "format", "minItems", "pattern"}
)  # fmt: skip
# SO "Not supported": named so the refusal says which rule, not just "unknown keyword".
_UNSUPPORTED = {
    "minimum": "numerical constraints", "maximum": "numerical constraints", "exclusiveMinimum": "numerical constraints",
    "exclusiveMaximum": "numerical constraints", "multipleOf": "numerical constraints",
    "minLength": "string length constraints", "maxLength": "string length constraints",
    "maxItems": "array constraints beyond minItems 0 or 1", "uniqueItems": "array constraints beyond minItems 0 or 1",
    "prefixItems": "array constraints beyond minItems 0 or 1", "contains": "array constraints beyond minItems 0 or 1",
    "oneOf": "oneOf (use anyOf)", "not": "not", "if": "conditionals", "then": "conditionals", "else": "conditionals",
    "patternProperties": "patternProperties", "propertyNames": "propertyNames",
    "minProperties": "object size constraints", "maxProperties": "object size constraints",
    "dependentRequired": "dependentRequired", "dependentSchemas": "dependentSchemas",
}  # fmt: skip


class SchemaError(ValueError):
    """A schema the API's structured outputs would refuse; `path` is a JSON pointer into the schema."""

    def __init__(self, path: str, reason: str) -> None:
        # One line whatever the schema's keys hold: a key with a newline must not split the rejection line.
        shown = "".join(char if char.isprintable() else repr(char)[1:-1] for char in path or "/")
        super().__init__(f"{shown}: {reason}")
        self.path = path
        self.reason = reason


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that does not say (as the SDK's own
    transform does): the API requires it (SO), and a pydantic model's schema leaves it out."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) if key not in ("enum", "const", "default", "examples") else value
           for key, value in schema.items()}  # fmt: skip
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def check_schema(schema: Any) -> None:
    """Raise SchemaError for the first feature the API's structured outputs would refuse (with a 400)."""
    if not isinstance(schema, dict):
        raise SchemaError("", "a schema must be a JSON object")
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        table = schema.get(key)
        if table is not None:
            if not isinstance(table, dict):
                raise SchemaError(f"/{key}", "must be an object of schemas")
            defs.update({f"#/{key}/{name}": sub for name, sub in table.items()})
    _check(schema, "", defs, ())


def _check(node: Any, path: str, defs: dict[str, Any], refs: tuple[str, ...]) -> None:
    if not isinstance(node, dict):
        raise SchemaError(path, "a schema must be a JSON object")
    for key in node:
        if key in _UNSUPPORTED:
            raise SchemaError(f"{path}/{key}", f"{_UNSUPPORTED[key]} are not supported by structured outputs")
        if key not in _STRUCTURE and key not in _ANNOTATIONS:
            raise SchemaError(f"{path}/{key}", f"keyword {key!r} is not supported by structured outputs")
    ref = node.get("$ref")
    if ref is not None:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaError(f"{path}/$ref", "only local references (#/$defs/...) are supported, not external ones")
        if ref not in defs:
            raise SchemaError(f"{path}/$ref", f"{ref} is not defined in $defs")
        if ref in refs:
            raise SchemaError(f"{path}/$ref", f"recursive schemas are not supported ({ref} refers to itself)")
        _check(defs[ref], ref[1:], defs, (*refs, ref))
    kinds = node.get("type")
    kind_list = kinds if isinstance(kinds, list) else [kinds] if kinds is not None else []
    for kind in kind_list:
        if not isinstance(kind, str) or kind not in TYPES:
            raise SchemaError(f"{path}/type", f"unknown type {kind!r}")
    if "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{path}/enum", "must be a non-empty list")
        if any(isinstance(value, dict | list) for value in values):
            raise SchemaError(f"{path}/enum", "complex types within enums are not supported")
    fmt = node.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in STRING_FORMATS):
        raise SchemaError(
            f"{path}/format", f"string format {fmt!r} is not supported ({', '.join(sorted(STRING_FORMATS))})"
        )
    pattern = node.get("pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError):
            raise SchemaError(f"{path}/pattern", f"not a regular expression: {pattern!r}") from None
    min_items = node.get("minItems")
    if min_items is not None and (isinstance(min_items, bool) or min_items not in (0, 1)):
        raise SchemaError(f"{path}/minItems", "only minItems 0 or 1 is supported")
    extra = node.get("additionalProperties")
    if extra is not None and extra is not False:
        raise SchemaError(f"{path}/additionalProperties", "must be false (anything else is not supported)")
    properties = node.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise SchemaError(f"{path}/properties", "must be an object of schemas")
        for name, sub in properties.items():
            _check(sub, f"{path}/properties/{name}", defs, refs)
    required = node.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise SchemaError(f"{path}/required", "must be a list of property names")
    if "items" in node:
        _check(node["items"], f"{path}/items", defs, refs)
    for key in ("anyOf", "allOf"):
        if key in node:
            branches = node[key]
            if not isinstance(branches, list) or not branches:
                raise SchemaError(f"{path}/{key}", "must be a non-empty list of schemas")
            for position, sub in enumerate(branches):
                if key == "allOf" and isinstance(sub, dict) and "$ref" in sub:
                    raise SchemaError(f"{path}/allOf/{position}", "allOf with $ref is not supported")
                _check(sub, f"{path}/{key}/{position}", defs, refs)


# --- validation: compiled once per schema into nested closures -------------------------------------------------

Check = Callable[[Any, str], str | None]  # (value, where) → None when valid, else the first error


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float)  # number


def _same(a: Any, b: Any) -> bool:
    # JSON equality: 1 == 1.0, but True is not 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def _compile(node: dict[str, Any], defs: dict[str, Any], cache: dict[str, Check]) -> Check:
    checks: list[Check] = []
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = ref

        def by_ref(value: Any, where: str) -> str | None:
            return cache[target](value, where)

        if target not in cache:
            cache[target] = _compile(defs[target], defs, cache)
        checks.append(by_ref)
    kinds = node.get("type")
    if kinds is not None:
        kind_tuple = tuple(kinds) if isinstance(kinds, list) else (kinds,)
        label = " or ".join(kind_tuple)

        def typed(value: Any, where: str) -> str | None:
            for kind in kind_tuple:
                if _type_ok(kind, value):
                    return None
            return f"{where}: expected {label}, got {_json_type(value)}"

        checks.append(typed)
    if "const" in node:
        const = node["const"]

        def constant(value: Any, where: str) -> str | None:
            return None if _same(value, const) else f"{where}: must be {orjson.dumps(const).decode()}"

        checks.append(constant)
    if "enum" in node:
        options = tuple(node["enum"])
        shown = ", ".join(orjson.dumps(option).decode() for option in options)

        def one_of(value: Any, where: str) -> str | None:
            for option in options:
                if _same(value, option):
                    return None
            return f"{where}: {_short(value)} is not one of {shown}"

        checks.append(one_of)
    properties = node.get("properties")
    required = tuple(node.get("required") or ())
    closed_object = node.get("additionalProperties") is False
    if properties is not None or required or closed_object:
        subs = {name: _compile(sub, defs, cache) for name, sub in (properties or {}).items()}

        def obj(value: Any, where: str) -> str | None:
            if not isinstance(value, dict):
                return None  # the type check reports it
            for name in required:
                if name not in value:
                    return f"{where}: missing required property {name!r}"
            for name, item in value.items():
                check = subs.get(name)
                if check is None:
                    if closed_object:
                        return f"{where}: unexpected property {name!r}"
                    continue
                error = check(item, f"{where}.{name}")
                if error is not None:
                    return error
            return None

        checks.append(obj)
    items = node.get("items")
    min_items = node.get("minItems")
    if items is not None or min_items:
        item_check = _compile(items, defs, cache) if isinstance(items, dict) else None
        least = int(min_items or 0)

        def arr(value: Any, where: str) -> str | None:
            if not isinstance(value, list):
                return None
            if len(value) < least:
                return f"{where}: needs at least {least} item(s)"
            if item_check is not None:
                for position, item in enumerate(value):
                    error = item_check(item, f"{where}[{position}]")
                    if error is not None:
                        return error
            return None

        checks.append(arr)
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        regex = re.compile(pattern)

        def matches(value: Any, where: str) -> str | None:
            if isinstance(value, str) and regex.search(value) is None:
                return f"{where}: does not match pattern {pattern!r}"
            return None

        checks.append(matches)
    for sub in node.get("allOf") or ():
        checks.append(_compile(sub, defs, cache))
    if node.get("anyOf"):
        branches = [_compile(sub, defs, cache) for sub in node["anyOf"]]

        def any_of(value: Any, where: str) -> str | None:
            errors = [branch(value, where) for branch in branches]
            if all(error is not None for error in errors):
                return errors[0] if len(errors) == 1 else f"{where}: matches none of anyOf ({errors[0]})"
            return None

        checks.append(any_of)
    if not checks:
        return _anything
    if len(checks) == 1:
        return checks[0]
    all_checks = tuple(checks)

    def every(value: Any, where: str) -> str | None:
        for check in all_checks:
            error = check(value, where)
            if error is not None:
                return error
        return None

    return every


def _anything(value: Any, where: str) -> str | None:
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "array" if isinstance(value, list) else type(value).__name__


def _short(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits: valid JSON, which orjson does not write
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def compile_validator(schema: dict[str, Any]) -> Check:
    """A function (value, where) → None or the first validation error; the schema must pass `check_schema`."""
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        defs.update({f"#/{key}/{name}": sub for name, sub in (schema.get(key) or {}).items()})
    return _compile(schema, defs, {})


@dataclass(frozen=True, eq=False)
class OutputSpec:
    """A task type's output schema on one model: the form its requests take and its compiled validator.

    Built once per (schema, model) and shared by every task that uses it.
    """

    schema: dict[str, Any]
    form: OutputForm
    validate: Check = field(repr=False)

    @classmethod
    def of(cls, schema: dict[str, Any], form: OutputForm) -> OutputSpec:
        return cls(schema, form, compile_validator(schema))

    def answer(self, content: list[dict[str, Any]], text: str) -> Any:
        """The answer to validate: the forced tool's input, or the JSON text (a code fence around it is allowed in
        the prompt form). Raises ValueError with the reason when there is none or it is not JSON."""
        if self.form == "tool":
            for block in content:
                if block.get("type") == "tool_use" and block.get("name") == TOOL_NAME:
                    return block.get("input")
            raise ValueError(f"no {TOOL_NAME} tool call in the answer")
        body = text.strip()
        if self.form == "prompt" and body.startswith("```"):
            body = body.split("\n", 1)[1] if "\n" in body else ""
            body = body.rsplit("```", 1)[0].strip()
        if not body:
            raise ValueError("the answer has no text")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"the answer is not JSON ({exc.msg} at character {exc.pos}): {_short(body)}") from None

    def parse(self, content: list[dict[str, Any]], text: str) -> tuple[Any, str | None]:
        """(parsed value, None) when the answer validates, else (None, one-line reason)."""
        try:
            value = self.answer(content, text)
        except ValueError as exc:
            return None, str(exc)
        error = self.validate(value, "$")
        if error is not None:
            return None, f"does not match the output schema: {error}"
        return value, None


def request_part(schema: dict[str, Any], form: OutputForm) -> dict[str, Any]:
    """The params that carry the schema in `form` (system text for "prompt" is added by the caller)."""
    if form == "output_config":
        return {"output_config": {"format": {"type": "json_schema", "schema": schema}}}
    if form == "tool":
        tool = {"name": TOOL_NAME, "description": "Record the result. Call it exactly once.", "input_schema": schema}
        return {"tools": [tool], "tool_choice": {"type": "tool", "name": TOOL_NAME}}
    return {}


def prompt_instruction(schema: dict[str, Any]) -> str:
    """The system-prompt text of the prompt form."""
    return (
        "Answer with exactly one JSON value and nothing else (no prose, no code fence). "
        "It must validate against this JSON Schema: " + orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
    )

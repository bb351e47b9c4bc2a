"""Structured outputs as the API serves them: the schemas `output_config.format` accepts (a 400 otherwise), and
answers generated from the schema.

Written from the API's documentation, independently of the engine's own checks (the emulator stands in for
Anthropic). Source for every rule below, unless marked otherwise: platform.claude.com/docs/en/build-with-claude/
structured-outputs, sections "JSON Schema limitations", "Schema validation errors" and "Feature compatibility"
(stored snapshots, late 2025 to 2026). The wording of the 400 messages is the emulator's: the page says only that
"you'll receive a 400 error with details" and quotes "Too many recursive definitions in schema" and "Schema is too
complex".
"""

from __future__ import annotations

import re
from typing import Any

from batch_engine.emulator.wire import ApiFailure, invalid

# "Supported features"
_BASIC_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
_FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"}
_ALLOWED_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "allOf", "$ref",
    "$defs", "definitions", "default", "format", "minItems", "pattern", "description", "title", "examples",
    "$schema", "$id", "$comment",
}  # fmt: skip
# "Not supported" (numerical, string-length and array constraints; other composition keywords)
_REFUSED_KEYWORDS = {
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
    "maxItems", "uniqueItems", "prefixItems", "contains", "minContains", "maxContains", "oneOf", "not", "if", "then",
    "else", "patternProperties", "propertyNames", "minProperties", "maxProperties", "dependentRequired",
    "dependentSchemas", "unevaluatedProperties", "unevaluatedItems",
}  # fmt: skip
# A schema nested deeper than this is answered with "Schema is too complex" (the limit is the emulator's own).
_MAX_DEPTH = 32
_GENERATION_DEPTH = 16


def schema_of(output_config: Any, model: str, structured_outputs: bool) -> dict[str, Any] | None:
    """The JSON schema of `output_config.format`, or None without one; ApiFailure (400) when the API refuses it."""
    if not isinstance(output_config, dict) or output_config.get("format") is None:
        return None
    fmt = output_config["format"]
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise invalid("output_config.format: Input should be {'type': 'json_schema', 'schema': {...}}")
    if not structured_outputs:
        raise invalid(f"output_config.format: structured outputs are not supported on the model {model}.")
    schema: dict[str, Any] = fmt["schema"]
    _Walker(schema).walk(schema, "output_config.format.schema", 0, frozenset())
    return schema


class _Walker:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def resolve(self, ref: Any, where: str) -> tuple[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise invalid(f"{where}.$ref: external $ref is not supported: {ref!r}")
        node: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(node, dict) or part not in node:
                raise invalid(f"{where}.$ref: {ref} does not resolve")
            node = node[part]
        return ref, node

    def walk(self, node: Any, where: str, depth: int, following: frozenset[str]) -> None:
        if depth > _MAX_DEPTH:
            raise invalid("Schema is too complex")
        if not isinstance(node, dict):
            raise invalid(f"{where}: a schema must be an object")
        for key in node:
            if key in _REFUSED_KEYWORDS:
                raise invalid(f"{where}: '{key}' is not supported in output_config.format schemas")
            if key not in _ALLOWED_KEYWORDS:
                raise invalid(f"{where}: unknown or unsupported keyword '{key}'")
        if "$ref" in node:
            ref, target = self.resolve(node["$ref"], where)
            if ref in following:
                raise invalid("Too many recursive definitions in schema")
            self.walk(target, ref, depth + 1, following | {ref})
        kind = node.get("type")
        for name in kind if isinstance(kind, list) else [] if kind is None else [kind]:
            if not isinstance(name, str) or name not in _BASIC_TYPES:
                raise invalid(f"{where}.type: '{name}' is not a valid type")
        if "enum" in node and (
            not isinstance(node["enum"], list) or any(isinstance(v, dict | list) for v in node["enum"])
        ):
            raise invalid(f"{where}.enum: only strings, numbers, booleans and nulls are supported in enums")
        if "format" in node and (not isinstance(node["format"], str) or node["format"] not in _FORMATS):
            raise invalid(f"{where}.format: string format '{node['format']}' is not supported")
        if "minItems" in node and (isinstance(node["minItems"], bool) or node["minItems"] not in (0, 1)):
            raise invalid(f"{where}.minItems: only 0 and 1 are supported")
        if "additionalProperties" in node and node["additionalProperties"] is not False:
            raise invalid(f"{where}.additionalProperties: must be false")
        if "pattern" in node:
            self._pattern(node["pattern"], where)
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise invalid(f"{where}.properties: Input should be an object")
        for name, sub in properties.items():
            self.walk(sub, f"{where}.properties.{name}", depth + 1, following)
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise invalid(f"{where}.required: Input should be a list of strings")
        if "items" in node:
            self.walk(node["items"], f"{where}.items", depth + 1, following)
        for key in ("anyOf", "allOf"):
            branches = node.get(key, [])
            if not isinstance(branches, list):
                raise invalid(f"{where}.{key}: Input should be a list")
            for position, sub in enumerate(branches):
                if key == "allOf" and isinstance(sub, dict) and "$ref" in sub:
                    raise invalid(f"{where}.allOf.{position}: allOf with $ref is not supported")
                self.walk(sub, f"{where}.{key}.{position}", depth + 1, following)

    @staticmethod
    def _pattern(pattern: Any, where: str) -> None:
        # "Pattern support": no backreferences, no lookaround, no word boundaries.
        if not isinstance(pattern, str):
            raise invalid(f"{where}.pattern: must be a string")
        if re.search(r"\\[1-9bB]|\(\?[=!<]", pattern):
            raise invalid(f"{where}.pattern: backreferences, lookaround and word boundaries are not supported")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise invalid(f"{where}.pattern: not a valid regular expression ({exc})") from None


# --- answers -----------------------------------------------------------------------------------------------------

_FORMAT_SAMPLES = {
    "date-time": "2026-01-01T00:00:00Z", "time": "00:00:00Z", "date": "2026-01-01", "duration": "P1D",
    "email": "someone@example.com", "hostname": "example.com", "uri": "https://example.com/", "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1", "uuid": "00000000-0000-4000-8000-000000000000",
}  # fmt: skip


class Generator:
    """Values that satisfy a schema the API accepted; strings carry `echo` so a reply proves what it answers."""

    def __init__(self, root: dict[str, Any], echo: str, seed: int) -> None:
        self.root = root
        self.echo = echo
        self.seed = seed

    def value(self, node: Any, depth: int = 0) -> Any:
        # Tool input schemas reach here unchecked (only output_config.format is validated), so nothing is trusted.
        if not isinstance(node, dict) or depth > _GENERATION_DEPTH:
            return self.echo
        if "$ref" in node:
            target = self._resolve(node["$ref"])
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}} if target is not None else {}
            return self.value(merged, depth + 1)
        if isinstance(node.get("allOf"), list):
            merged = {k: v for k, v in node.items() if k != "allOf"}
            for sub in node["allOf"]:
                merged = _merge(merged, sub)
            return self.value(merged, depth + 1)
        if "const" in node:
            return node["const"]
        options = node.get("enum")
        if isinstance(options, list) and options:
            return options[0]
        branches = node.get("anyOf")
        if isinstance(branches, list) and branches:
            return self.value(branches[0], depth + 1)
        kind = node.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        properties = node.get("properties")
        if kind == "object" or (kind is None and isinstance(properties, dict)):
            if not isinstance(properties, dict):
                return {}
            return {str(name): self.value(sub, depth + 1) for name, sub in properties.items()}
        if kind == "array":
            least = node.get("minItems")
            # minItems items (a few at most), else one: the answer only has to be valid, not large.
            count = min(least, 3) if isinstance(least, int) and not isinstance(least, bool) and least > 0 else 1
            return [self.value(node.get("items"), depth + 1) for _ in range(count)]
        if kind in ("integer", "number"):
            low = node.get("minimum")  # tool schemas may carry one; output_config.format schemas may not
            return low if isinstance(low, int | float) and not isinstance(low, bool) else 0
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt in _FORMAT_SAMPLES:
            return _FORMAT_SAMPLES[fmt]
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            return _matching(pattern, self.echo)
        return self.echo

    def _resolve(self, ref: Any) -> dict[str, Any] | None:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return None
        target: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                return None
            target = target[part]
        return target if isinstance(target, dict) else None

    def broken(self, node: dict[str, Any]) -> Any:
        """An answer that does not validate, for injected invalid outputs: a required property left out, or prose."""
        value = self.value(node)
        required = node.get("required")
        if isinstance(value, dict) and isinstance(required, list) and required:
            # A copy: the value may be the schema's own `const` (params are shared between batch rows).
            return {key: item for key, item in value.items() if key != required[0]}
        return f"Sorry, I can only answer in prose ({self.echo})."


def _merge(a: dict[str, Any], b: Any) -> dict[str, Any]:
    if not isinstance(b, dict):
        return a
    out = {**a, **{k: v for k, v in b.items() if k not in ("properties", "required")}}
    props_a, props_b = a.get("properties"), b.get("properties")
    out["properties"] = {
        **(props_a if isinstance(props_a, dict) else {}),
        **(props_b if isinstance(props_b, dict) else {}),
    }
    req_a, req_b = a.get("required"), b.get("required")
    out["required"] = [*(req_a if isinstance(req_a, list) else []), *(req_b if isinstance(req_b, list) else [])]
    return out


def _matching(pattern: str, echo: str) -> str:
    try:
        regex = re.compile(pattern)
    except re.error:
        return echo
    for candidate in (echo, "a", "A", "0", "a1", "A1", "aa", "00", ""):
        if regex.search(candidate):
            return candidate
    return echo


def check_compatible(has_format: bool, prefilled: bool) -> None:
    """ "Feature compatibility": JSON outputs are incompatible with message prefilling."""
    if has_format and prefilled:
        raise invalid("output_config.format cannot be used with a prefilled assistant message.")


__all__ = ["ApiFailure", "Generator", "check_compatible", "schema_of"]

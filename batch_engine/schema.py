"""JSON Schemas of the input records and of the output file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from batch_engine.models import OutputFile, TaskRequest


def json_schema(kind: Literal["input", "output"]) -> dict[str, Any]:
    """The JSON Schema of one input record, or of the whole output file."""
    model: type[BaseModel] = TaskRequest if kind == "input" else OutputFile
    return model.model_json_schema()

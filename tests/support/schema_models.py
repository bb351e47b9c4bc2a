"""Pydantic models that configs in the tests name as `output_schema_model = "tests.support.schema_models:..."`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Vendor(BaseModel):
    name: str
    country: str


class Ticket(BaseModel):
    label: Literal["bug", "billing", "other"]
    vendor: Vendor
    tags: list[str]
    note: str | None = None


class Scored(BaseModel):
    score: int = Field(ge=0, le=10)  # minimum / maximum: the API refuses numerical constraints

"""Settings, task registry and price table, loaded from TOML (the default ships inside the package)."""

from __future__ import annotations

import functools
import tomllib
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from batch_engine.errors import ConfigError

Tier = Literal["cheap", "capable", "premium"]
Route = Literal["batch", "realtime"]


class _Strict(BaseModel):
    # No inf/nan in any number: TOML allows them, and e.g. `tokenizer_factor = inf` crashed planning.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Price(_Strict):
    """USD per million tokens at standard (realtime) rates."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write_5m: float = Field(ge=0)
    cache_write_1h: float = Field(ge=0)
    cache_read: float = Field(ge=0)


class ModelSpec(_Strict):
    """What the engine must know about one model: limits, parameter rules and prices."""

    max_output_tokens: int = Field(gt=0)
    context_tokens: int = Field(gt=0)
    min_cacheable_tokens: int = Field(gt=0)
    manual_thinking: bool
    sampling_params: bool
    # Whether the model thinks when a request omits `thinking`, and the `thinking.type` that turns it off ("none":
    # it cannot be turned off). Docs: /build-with-claude/thinking-troubleshooting, /models/haiku-5-5/whats-new,
    # /models/sonnet-5-5/whats-new (reference anthropic-api.md §6).
    thinks_by_default: bool = False
    thinking_off: Literal["disabled", "between_tools", "none"] = "disabled"
    # Tokens per token of the offline estimate's base rule (Claude 4.6 and older): Claude 4.7+ and all 5.x count
    # "about 30 percent more tokens" for the same text (docs: /models/haiku-5-5/whats-new-haiku-5-5).
    tokenizer_factor: float = Field(default=1.0, gt=0, le=10)  # ~1.0-1.3 for every model the docs list
    # Structured outputs (output_config.format with a JSON schema): which models take them is listed on the
    # structured-outputs page (platform.claude.com/docs/en/build-with-claude/structured-outputs); a model that
    # does not gets a fallback form (see structured_output.py).
    structured_outputs: bool = False
    # Forced tool_choice ({"type": "tool"} / "any") returns 400 on Opus 5.5, Sonnet 5.5 and Fable 5.1
    # (whats-new-sonnet-5-5 "Forced tool use returns an error"; reference §0.4).
    forced_tool_choice: bool = True
    price: Price
    long_prompt_threshold_tokens: int | None = None
    long_prompt_price: Price | None = None
    price_source: str
    price_as_of: date

    @model_validator(mode="after")
    def _long_prompt_pair(self) -> ModelSpec:
        if (self.long_prompt_threshold_tokens is None) != (self.long_prompt_price is None):
            raise ValueError("long_prompt_threshold_tokens and long_prompt_price go together")
        return self

    def price_for_prompt(self, prompt_tokens: int) -> Price:
        """The rate card that applies to a request whose whole prompt has `prompt_tokens` tokens."""
        if (
            self.long_prompt_price is not None
            and self.long_prompt_threshold_tokens is not None
            and prompt_tokens > self.long_prompt_threshold_tokens
        ):
            return self.long_prompt_price
        return self.price


class Thinking(_Strict):
    mode: Literal["off", "adaptive", "manual"] = "off"
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    budget_tokens: int | None = Field(default=None, ge=1024)

    @model_validator(mode="after")
    def _manual_needs_budget(self) -> Thinking:
        if self.mode == "manual" and self.budget_tokens is None:
            raise ValueError("thinking.mode = 'manual' needs budget_tokens")
        return self


class TaskType(_Strict):
    """One entry of the task registry: how a task type is prompted and routed by default."""

    mode: Route
    tier: Tier = "capable"
    max_tokens: int = Field(default=1024, gt=0)
    system: str = ""
    user: str
    cache_system: bool = True
    stream: bool = False
    thinking: Thinking = Thinking()
    # The answer's JSON Schema, at most one of: inline, a file (relative to the config file), or a pydantic model
    # ("package.module:Model"). load_config resolves the last two into output_schema.
    output_schema: dict[str, Any] | None = None
    output_schema_file: str | None = None
    output_schema_model: str | None = None

    @model_validator(mode="after")
    def _one_schema_source(self) -> TaskType:
        given = [self.output_schema_file, self.output_schema_model]
        if sum(source is not None for source in given) > 1:
            raise ValueError("give output_schema_file or output_schema_model, not both")
        return self


class Limits(_Strict):
    realtime_concurrency: int = Field(default=32, ge=1)
    rpm: int = Field(default=1000, ge=1)
    itpm: int = Field(default=2_000_000, ge=1)
    otpm: int = Field(default=400_000, ge=1)
    batch_rpm: int = Field(default=1000, ge=1)
    count_tokens_rpm: int = Field(default=2000, ge=1)
    batch_poll_initial_s: float = Field(default=5.0, gt=0)
    batch_poll_interval_s: float = Field(default=60.0, gt=0)
    batch_timeout_s: float = Field(default=86_400, gt=0)
    # API limits: 100,000 requests or 256 MB per batch, whichever comes first.
    max_requests_per_batch: int = Field(default=100_000, ge=1, le=100_000)
    max_bytes_per_batch: int = Field(default=256_000_000, ge=1024, le=256_000_000)
    max_row_attempts: int = Field(default=3, ge=1)
    # Rows whose answer does not validate against the task type's output schema are sent again through the
    # realtime lane this many times (each retry billed and counted in the row's cost).
    invalid_output_retries: int = Field(default=1, ge=0)
    on_batch_timeout: Literal["realtime", "timed_out"] = "realtime"
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_retry_attempts: int = Field(default=8, ge=1)
    max_retry_time_s: float = Field(default=300.0, gt=0)
    # Where the realtime lane's HTTP work runs: "auto" (a sender process for big lanes on 2+ CPUs), "inline" (in
    # the engine's process), "process" (always a sender process). See batch_engine/lanes/sender.py.
    realtime_sender: Literal["auto", "inline", "process"] = "auto"


class Config(_Strict):
    """The whole effective configuration of a run."""

    batch_discount: float = Field(default=0.5, gt=0, le=1)
    batch_sla_s: float = Field(default=86_400, gt=0)
    tiers: dict[Tier, str]
    # Where the run ledger and the usage log live (README "Several machines"); excluded from the config a run
    # records, since it says where, not what, and may carry a password.
    state_url: str | None = Field(default=None, exclude=True)
    limits: Limits = Limits()
    models: dict[str, ModelSpec]
    task_types: dict[str, TaskType]

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        for tier, model in self.tiers.items():
            if model not in self.models:
                raise ValueError(f"tiers.{tier}: model {model!r} has no [models.{model}] entry")
        for tier in ("cheap", "capable", "premium"):
            if tier not in self.tiers:
                raise ValueError(f"tiers.{tier}: missing")
        for name, task_type in self.task_types.items():
            model = self.tiers[task_type.tier]
            thinking = task_type.thinking
            if thinking.mode == "manual":
                if not self.models[model].manual_thinking:
                    raise ValueError(
                        f"task_types.{name}.thinking: {model} rejects manual budget_tokens; use mode = 'adaptive'"
                    )
                if thinking.budget_tokens is not None and thinking.budget_tokens >= task_type.max_tokens:
                    raise ValueError(f"task_types.{name}.thinking.budget_tokens must be < max_tokens")
        return self

    def model_for_tier(self, tier: Tier) -> str:
        return self.tiers[tier]


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Parse and validate TOML text; errors name the file and the key.

    Output schemas given by file (relative to `base_dir`) or by pydantic model are loaded here, and every output
    schema is checked against what the API's structured outputs accept.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "<root>"
        raise ConfigError(f"{source}: {key}: {first['msg']}") from exc
    return _with_output_schemas(config, source, base_dir or Path.cwd())


def _with_output_schemas(config: Config, source: str, base_dir: Path) -> Config:
    from batch_engine.structured_output import SchemaError, check_schema, closed

    resolved: dict[str, TaskType] = {}
    for name, task_type in config.task_types.items():
        key = f"task_types.{name}.output_schema"
        schema = task_type.output_schema
        if task_type.output_schema_file is not None:
            key += "_file"
            schema = _schema_file(base_dir / task_type.output_schema_file, f"{source}: {key}")
        elif task_type.output_schema_model is not None:
            key += "_model"
            schema = _schema_model(task_type.output_schema_model, f"{source}: {key}")
        if schema is None:
            continue
        schema = closed(schema)
        try:
            check_schema(schema)
        except SchemaError as exc:
            raise ConfigError(f"{source}: {key}: the API would refuse this schema: {exc}") from None
        resolved[name] = task_type.model_copy(update={"output_schema": schema})
    if not resolved:
        return config
    return config.model_copy(update={"task_types": {**config.task_types, **resolved}})


def _schema_file(path: Path, where: str) -> Any:
    from batch_engine.errors import InputError
    from batch_engine.files import loads, read_bytes

    try:
        return loads(read_bytes(path))
    except InputError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {path} is not JSON: {exc}") from None


def _schema_model(target: str, where: str) -> Any:
    import importlib

    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{where}: expected 'package.module:Model', got {target!r}")
    try:
        model = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import {target}: {exc}") from None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(f"{where}: {target} is not a pydantic model")
    return model.model_json_schema()


def default_config_text() -> str:
    return resources.files("batch_engine").joinpath("default_config.toml").read_text(encoding="utf-8")


@functools.cache
def _default_config() -> Config:
    # Parsed once per process: the config is frozen, and in-process callers (tests, `report`) load it often.
    return parse_config(default_config_text(), "default_config.toml")


def load_config(path: Path | str | None = None) -> Config:
    """Load the config at `path`, or the one shipped with the package."""
    if path is None:
        return _default_config()
    from batch_engine.files import read_text

    return parse_config(read_text(Path(path)), str(path), Path(path).parent)

"""What the emulator can be told to do: latency, limits, faults, batch timing and time scaling."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Endpoint names used by scripted faults and `fault_endpoints` ("*" means every endpoint).
ENDPOINTS: dict[str, str] = {
    "messages": "POST /v1/messages",
    "count_tokens": "POST /v1/messages/count_tokens",
    "batches_create": "POST /v1/messages/batches",
    "batches_list": "GET /v1/messages/batches",
    "batches_retrieve": "GET /v1/messages/batches/{id}",
    "batches_cancel": "POST /v1/messages/batches/{id}/cancel",
    "batches_delete": "DELETE /v1/messages/batches/{id}",
    "batches_results": "GET /v1/messages/batches/{id}/results",
    "models": "GET /v1/models",
}

RowErrorType = Literal["api_error", "overloaded_error", "rate_limit_error", "invalid_request_error", "timeout_error"]


class EmulatorSettings(BaseModel):
    """Emulator behaviour. Durations of batches, expiry and cache TTLs run on the emulator's scaled clock;
    latency and rate-limit refill run on wall time, because that is what a client waits for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_s: float = Field(default=0.0, ge=0)
    jitter_s: float = Field(default=0.0, ge=0)
    rpm: int | None = Field(default=None, ge=1)
    itpm: int | None = Field(default=None, ge=1)
    otpm: int | None = Field(default=None, ge=1)
    batch_rpm: int | None = Field(default=None, ge=1)
    count_tokens_rpm: int | None = Field(default=None, ge=1)
    batch_duration_s: float = Field(default=2.0, ge=0)
    time_scale: float = Field(default=1.0, gt=0)
    seed: int = 0
    fault_rate_429: float = Field(default=0.0, ge=0, le=1)
    fault_rate_529: float = Field(default=0.0, ge=0, le=1)
    fault_rate_500: float = Field(default=0.0, ge=0, le=1)
    fault_rate_drop: float = Field(default=0.0, ge=0, le=1)
    fault_retry_after_s: float = Field(default=1.0, ge=0)
    fault_endpoints: tuple[str, ...] = ("messages",)
    # batches.create and Messages only, whatever fault_endpoints says: do the work (create, answer and bill),
    # then answer 500 or 529.
    fault_after_commit_rate: float = Field(default=0.0, ge=0, le=1)
    batch_row_error_rate: float = Field(default=0.0, ge=0, le=1)
    batch_row_error_type: RowErrorType = "api_error"
    batch_row_expire_rate: float = Field(default=0.0, ge=0, le=1)
    batch_never_ends: bool = False
    reply_tokens: int | None = Field(default=None, ge=1)
    # Share of JSON answers (output_config.format or a forced tool) made not to validate against their schema.
    invalid_output_rate: float = Field(default=0.0, ge=0, le=1)
    # Share of answered requests (Messages and batch rows) that end `stop_reason: "refusal"`, billed.
    refusal_rate: float = Field(default=0.0, ge=0, le=1)
    # Share of answered requests that carry a server tool (web search, web fetch, code execution) and end
    # `stop_reason: "pause_turn"`: the server-side tool loop reached its iteration limit and the client must send
    # the assistant content back to continue (docs: /api/handling-stop-reasons). Billed like any answer.
    pause_turn_rate: float = Field(default=0.0, ge=0, le=1)
    # Requests waiting in the batch processing queue, across all batches; a create over it is a 429.
    batch_queue_cap: int | None = Field(default=None, ge=1)
    # Share of batch rows whose live cache entry is actually read: batch cache hits are best-effort, "typically
    # 30-98%" (docs: /build-with-claude/batch-processing, prompt caching with Message Batches). A miss writes again.
    batch_cache_hit_rate: float = Field(default=0.6, ge=0, le=1)
    api_key: str | None = Field(default=None, min_length=1, repr=False)
    # Ignored: the emulator serves its own model catalog (catalog.py), written from the docs rather than from the
    # engine's config. Kept so existing `--config` command lines and callers still run.
    config_path: Path | None = None
    state_file: Path | None = None
    max_message_body_bytes: int = Field(default=32_000_000, ge=1024)
    max_batch_body_bytes: int = Field(default=256_000_000, ge=1024)
    max_batch_requests: int = Field(default=100_000, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> EmulatorSettings:
        if self.fault_rate_429 + self.fault_rate_529 + self.fault_rate_500 + self.fault_rate_drop > 1:
            raise ValueError("fault rates add up to more than 1")
        if self.batch_row_error_rate + self.batch_row_expire_rate > 1:
            raise ValueError("batch_row_error_rate + batch_row_expire_rate is more than 1")
        unknown = set(self.fault_endpoints) - set(ENDPOINTS) - {"*"}
        if unknown:
            raise ValueError(f"fault_endpoints: unknown {sorted(unknown)}; known: {sorted(ENDPOINTS)} or '*'")
        return self

    def public(self) -> dict[str, object]:
        """The settings as JSON-ready data, with the API key masked."""
        data = self.model_dump(mode="json")
        if self.api_key is not None:
            data["api_key"] = "***"
        return data

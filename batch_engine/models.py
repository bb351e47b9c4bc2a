"""Wire and file models: what comes in (TaskRequest), what goes out (TaskResult, RunSummary, Rejection)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from batch_engine.config import Route, Tier

TASK_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

Mode = Literal["auto", "batch", "realtime"]
Status = Literal[
    "succeeded",
    "refused",
    "incomplete",
    "invalid_output",
    "errored",
    "expired",
    "canceled",
    "timed_out",
    "rejected",
    "skipped_budget",
]
# Answered and billed. Only "succeeded" did the task: "refused" ended `stop_reason: refusal`; "incomplete" ended
# `pause_turn`, `model_context_window_exceeded`, or `max_tokens` with no text (e.g. all of it spent thinking);
# "invalid_output" answered, but not to the task type's output schema.
BILLED_STATUSES = frozenset({"succeeded", "refused", "incomplete", "invalid_output"})


class TaskRequest(BaseModel):
    """One record of the input file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str = Field(pattern=TASK_ID_PATTERN, description="Unique in the file; becomes the batch custom_id.")
    task_type: str = Field(min_length=1, description="A key of the task registry (config task_types).")
    input_data: dict[str, Any] = Field(default_factory=dict, description="Variables for the prompt template.")
    model_tier: Tier | None = None
    model: str | None = Field(default=None, min_length=1, description="Explicit model id; wins over model_tier.")
    mode: Mode = "auto"
    deadline: datetime | None = Field(default=None, description="ISO-8601; sooner than the batch SLA → realtime.")
    max_latency_s: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)
    system: str | None = Field(default=None, description="Overrides the task type's system prompt.")
    params: dict[str, Any] | None = Field(
        default=None, description="Raw Messages API params; bypasses the template (escape hatch)."
    )
    metadata: dict[str, Any] | None = Field(default=None, description="Passed through to the output untouched.")


class Rejection(BaseModel):
    """A record that could not become a task; the rest of the file still runs."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="0-based position of the record in the file.")
    line: int | None = Field(default=None, description="1-based line number (JSONL input).")
    task_id: str | None = None
    field: str
    reason: str

    def one_line(self) -> str:
        where = f"line {self.line}" if self.line is not None else f"record {self.index}"
        who = f" (task_id {self.task_id})" if self.task_id else ""
        return f"{where}{who}: {self.field}: {self.reason}"


class Usage(BaseModel):
    """Token usage of one billed request, flattened from the API's usage object."""

    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    thinking_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """All input the model saw: uncached + cache read + cache written."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens


class Tokens(NamedTuple):
    """A finished row's billed tokens: `Usage`'s fields, in its order, as a plain tuple. What the lanes, the usage
    log and the cost math read per stored row, where building a pydantic `Usage` took a tenth of the CPU of storing
    100k rows (`bench plan`); the row's JSON carries the same numbers."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    thinking_tokens: int = 0

    @classmethod
    def of(cls, usage: Usage) -> Tokens:
        return cls(**usage.model_dump())

    @property
    def prompt_tokens(self) -> int:
        """All input the model saw: uncached + cache read + cache written."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    request_id: str | None = None


class TaskResult(BaseModel):
    """One row of the output: every input task appears exactly once, in input order."""

    task_id: str | None
    index: int
    status: Status
    task_type: str | None = None
    route: Route | None = None
    model: str | None = None
    batch_id: str | None = None
    attempts: int = 0
    output_retries: int = Field(
        default=0, description="Times an invalid_output answer was asked again (realtime); its cost is included."
    )
    text: str | None = None
    parsed: Any = Field(
        default=None,
        description="For task types with an output schema: the answer as a JSON value, validated against the "
        "schema (null when the row has no valid answer; the row is then `invalid_output` with the reason in `error`).",
    )
    content: list[dict[str, Any]] | None = None
    stop_reason: str | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    error: ErrorInfo | None = None
    metadata: dict[str, Any] | None = None


class BatchSummary(BaseModel):
    """One Message Batch of a run, as last seen."""

    id: str
    chunk: str
    status: str
    request_counts: dict[str, int] | None = None


class TokenTotals(BaseModel):
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    thinking: int = 0


class CostSummary(BaseModel):
    total_usd: float = 0.0
    baseline_usd: float = Field(default=0.0, description="Same usage all-realtime with no prompt caching.")
    savings_usd: float = 0.0
    savings_pct: float = 0.0

    @classmethod
    def of(cls, spent_usd: float, baseline_usd: float) -> CostSummary:
        """Spend against the baseline, rounded to the micro-dollar."""
        saved = baseline_usd - spent_usd
        return cls(
            total_usd=round(spent_usd, 6),
            baseline_usd=round(baseline_usd, 6),
            savings_usd=round(saved, 6),
            savings_pct=round(100 * saved / baseline_usd, 2) if baseline_usd else 0.0,
        )


class RunCounts(BaseModel):
    """How the run's input records ended."""

    total: int = Field(description="Input records, rejected ones included.")
    succeeded: int
    failed: int = Field(description="Neither succeeded nor rejected: every other status.")
    rejected: int = Field(description="Records refused before anything was sent (bad input).")
    invalid_output: int = Field(default=0, description="Answered, but not to the task type's output schema.")
    by_route: dict[Route, int] = Field(default_factory=dict, description="Records that were sent, by route.")
    by_status: dict[Status, int] = Field(default_factory=dict, description="Every record, by status.")


class RunSummary(BaseModel):
    """The `run` section of the output file: what happened, what it cost, and against what baseline."""

    run_key: str
    input_path: str
    output_path: str
    simulated: bool = False
    started_at: datetime
    finished_at: datetime
    counts: RunCounts
    batches: list[BatchSummary]
    tokens: TokenTotals
    cost: CostSummary
    cache_hit_rate: float = Field(description="Cache read tokens / (read + written + uncached input tokens).")
    durations_s: dict[str, float]

    @property
    def all_succeeded(self) -> bool:
        return self.counts.succeeded == self.counts.total


class OutputFile(BaseModel):
    """The merged result file (`--format json`): the run summary and one row per input record, in input order.

    `--format jsonl` writes the same as lines: `{"run": ...}` first, then one row per line.
    """

    run: RunSummary
    results: list[TaskResult]

"""Pure: the `run` section of the output — counts, batches, tokens, cost against the all-realtime no-cache
baseline, cache hit rate by tokens — computed in one pass over the output rows, and the output's bytes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from batch_engine.config import Config, ModelSpec
from batch_engine.models import BatchSummary, CostSummary, RunCounts, RunSummary, TaskResult, TokenTotals, Usage
from batch_engine.planning.pricing import baseline_tokens_cost

OutputFormat = Literal["json", "jsonl", "parsed-jsonl"]
_USAGE_FIELDS = tuple(Usage.model_fields)
_UNSEEN: Any = object()


class Tally:
    """The `run` section's counts, tokens and cost, added up one output row at a time."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.by_status: Counter[str] = Counter()
        self.by_route: Counter[str] = Counter()
        # `TokenTotals` in the order of `Usage`'s fields (input, output, cache read, cache write, 5m, 1h, thinking).
        self.tokens = [0] * len(_USAGE_FIELDS)
        self.spent = self.baseline = 0.0
        self._specs: dict[str | None, ModelSpec | None] = {}

    def add(self, row: Mapping[str, Any]) -> None:
        """One row, as its output JSON decoded (what the ledger stores: validating 1M rows into `TaskResult`s
        only to count them was most of the cost of writing the output)."""
        self.by_status[row["status"]] += 1
        route = row.get("route")
        if route is not None:
            self.by_route[route] += 1
        self.spent += row.get("cost_usd") or 0.0
        usage = row.get("usage")
        if usage is None:
            return
        # Spelled out, not looped over the names: this runs once per output row. A stored row's usage has every
        # field of `Usage`, in its order (rows are `TaskResult`s dumped), so its values are read in one go.
        if len(usage) == len(_USAGE_FIELDS):
            uncached, output, read, written, write_5m, write_1h, thinking = usage.values()
        else:
            uncached, output, read, written, write_5m, write_1h, thinking = (usage.get(f, 0) for f in _USAGE_FIELDS)
        tokens = self.tokens
        tokens[0] += uncached
        tokens[1] += output
        tokens[2] += read
        tokens[3] += written
        tokens[4] += write_5m
        tokens[5] += write_1h
        tokens[6] += thinking
        model = row.get("model")
        spec = self._specs.get(model, _UNSEEN)
        if spec is _UNSEEN:
            spec = self._specs[model] = self.config.models.get(model or "")
        if spec is not None:
            self.baseline += baseline_tokens_cost(uncached + read + written, output, spec)

    def summary(
        self,
        *,
        run_key: str,
        input_path: str,
        output_path: str,
        simulated: bool,
        started_at: float,
        finished_at: float,
        total: int,
        batches: Sequence[tuple[str, str, dict[str, int] | None, bool]],
        durations_s: dict[str, float],
    ) -> RunSummary:
        """The run summary of the rows added; `batches` are (chunk key, batch id, last request counts, lost: the
        API no longer knows the batch)."""
        input_, output, read, written, write_5m, write_1h, thinking = self.tokens
        tokens = TokenTotals(
            input=input_,
            output=output,
            cache_read=read,
            cache_write=written,
            cache_write_5m=write_5m,
            cache_write_1h=write_1h,
            thinking=thinking,
        )
        prompt = tokens.input + tokens.cache_read + tokens.cache_write
        by_status = self.by_status
        succeeded = by_status.get("succeeded", 0)
        rejected = by_status.get("rejected", 0)
        return RunSummary(
            run_key=run_key,
            input_path=input_path,
            output_path=output_path,
            simulated=simulated,
            started_at=datetime.fromtimestamp(started_at, UTC),
            finished_at=datetime.fromtimestamp(finished_at, UTC),
            counts=RunCounts(
                total=total,
                succeeded=succeeded,
                failed=total - succeeded - rejected,
                rejected=rejected,
                invalid_output=by_status.get("invalid_output", 0),
                by_route=dict(sorted(self.by_route.items())),
                by_status=dict(sorted(by_status.items())),
            ),
            batches=[
                BatchSummary(
                    id=batch_id,
                    chunk=chunk,
                    status="lost" if lost else "ended" if counts and not counts.get("processing") else "in_progress",
                    request_counts=counts,
                )
                for chunk, batch_id, counts, lost in batches
            ],
            tokens=tokens,
            cost=CostSummary.of(self.spent, self.baseline),
            cache_hit_rate=round(tokens.cache_read / prompt, 4) if prompt else 0.0,
            durations_s=dict(durations_s),
        )


def _row_json(row: TaskResult | bytes) -> bytes:
    return row if isinstance(row, bytes) else orjson.dumps(row.model_dump(mode="json"))


def encode_head(summary: RunSummary, output_format: OutputFormat) -> bytes:
    """The output's bytes before its rows."""
    if output_format == "parsed-jsonl":
        return b""
    run = orjson.dumps(summary.model_dump(mode="json"))
    return b'{"run":' + run + (b"}\n" if output_format == "jsonl" else b',"results":[')


def encode_tail(output_format: OutputFormat) -> bytes:
    """The output's bytes after its rows."""
    return b"]}\n" if output_format == "json" else b""


def encode_rows(rows: Iterable[TaskResult | bytes], output_format: OutputFormat) -> Iterator[bytes]:
    """The output's rows, each with its separator. A row may come already encoded (the ledger stores each row as
    its output JSON): decoding and encoding it again was half the cost of a merge."""
    if output_format == "parsed-jsonl":
        # Ready for a table: no run line, no text; every record still has its line (parsed null when none).
        for row in rows:
            if isinstance(row, bytes):
                stored = orjson.loads(row)
                line = {
                    "task_id": stored.get("task_id"),
                    "status": stored.get("status"),
                    "parsed": stored.get("parsed"),
                }
            else:
                line = {"task_id": row.task_id, "status": row.status, "parsed": row.parsed}
            yield orjson.dumps(line) + b"\n"
    elif output_format == "jsonl":
        for row in rows:
            yield (row if isinstance(row, bytes) else _row_json(row)) + b"\n"
    else:
        separator = b""
        for row in rows:
            yield separator + (row if isinstance(row, bytes) else _row_json(row))
            separator = b","


def encode_output(
    summary: RunSummary, rows: Iterable[TaskResult | bytes], output_format: OutputFormat
) -> Iterator[bytes]:
    """The output file's bytes, in the same shape a single run writes."""
    yield encode_head(summary, output_format)
    yield from encode_rows(rows, output_format)
    yield encode_tail(output_format)

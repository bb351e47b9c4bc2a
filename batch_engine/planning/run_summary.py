"""Pure: the `run` section of the output — counts, batches, tokens, cost against the all-realtime no-cache
baseline, cache hit rate by tokens — computed in one pass over the output rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Literal

import orjson

from batch_engine.config import Config
from batch_engine.models import BatchSummary, CostSummary, RunCounts, RunSummary, TaskResult, TokenTotals
from batch_engine.planning.pricing import baseline_cost


def summarize(
    rows: Iterable[TaskResult],
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
    config: Config,
) -> RunSummary:
    """Summarize the output rows of a run; `batches` are (chunk key, batch id, last request counts, lost: the
    API no longer knows the batch)."""
    by_status: Counter[str] = Counter()
    by_route: Counter[str] = Counter()
    # Plain ints while counting: a pydantic attribute assignment costs ~1 µs, seven of them per row.
    input_ = output = cache_read = cache_write = cache_write_5m = cache_write_1h = thinking = 0
    spent = baseline = 0.0
    for row in rows:
        by_status[row.status] += 1
        if row.route is not None:
            by_route[row.route] += 1
        spent += row.cost_usd or 0.0
        usage = row.usage
        if usage is None:
            continue
        input_ += usage.input_tokens
        output += usage.output_tokens
        cache_read += usage.cache_read_input_tokens
        cache_write += usage.cache_creation_input_tokens
        cache_write_5m += usage.cache_write_5m_tokens
        cache_write_1h += usage.cache_write_1h_tokens
        thinking += usage.thinking_tokens
        spec = config.models.get(row.model or "")
        if spec is not None:
            baseline += baseline_cost(usage, spec)
    tokens = TokenTotals(
        input=input_,
        output=output,
        cache_read=cache_read,
        cache_write=cache_write,
        cache_write_5m=cache_write_5m,
        cache_write_1h=cache_write_1h,
        thinking=thinking,
    )
    prompt = tokens.input + tokens.cache_read + tokens.cache_write
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
            by_route=dict(sorted(by_route.items())),
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
        cost=CostSummary.of(spent, baseline),
        cache_hit_rate=round(tokens.cache_read / prompt, 4) if prompt else 0.0,
        durations_s=dict(durations_s),
    )


def _row_json(row: TaskResult | bytes) -> bytes:
    return row if isinstance(row, bytes) else orjson.dumps(row.model_dump(mode="json"))


def encode_output(
    summary: RunSummary, rows: Iterable[TaskResult | bytes], output_format: Literal["json", "jsonl", "parsed-jsonl"]
) -> Iterator[bytes]:
    """The output file's bytes, in the same shape a single run writes. A row may come already encoded (the
    ledger stores each row as its output JSON): decoding and encoding it again was half the cost of a merge."""
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
        return
    run = summary.model_dump(mode="json")
    if output_format == "jsonl":
        yield orjson.dumps({"run": run}) + b"\n"
        for row in rows:
            yield _row_json(row) + b"\n"
        return
    yield b'{"run":' + orjson.dumps(run) + b',"results":['
    for position, row in enumerate(rows):
        yield (b"," if position else b"") + _row_json(row)
    yield b"]}\n"

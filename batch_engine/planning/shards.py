"""Pure: split a task file's records into contiguous shards, and merge the shards' outputs into one output in
input order, with one `run` summary over all of them.

Each shard is an ordinary task file with its own run key, so no batch is ever shared by two shards, and the
same input split the same way gives the same shard bytes, hence the same run keys: a re-run re-attaches. A cost
cap for the whole input is split into one cap per shard, which each shard run enforces on its own.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal

import orjson
from pydantic import BaseModel

from batch_engine.config import Route
from batch_engine.errors import BatchEngineError
from batch_engine.models import BatchSummary, CostSummary, RunCounts, RunSummary, Status, TaskResult, TokenTotals


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Records `offset` .. `offset + count - 1` of the input."""

    number: int
    offset: int
    count: int


class ShardRun(BaseModel):
    """One shard in the merged `run` summary."""

    number: int
    offset: int
    records: int
    run_key: str
    input_path: str
    output_path: str


class ShardedRunSummary(RunSummary):
    """The merged `run` section: the shards' counts, tokens and cost added up, and the shards themselves."""

    shards: list[ShardRun]


def shard_specs(total: int, shards: int) -> list[ShardSpec]:
    """`shards` contiguous ranges of near-equal size covering `total` records; never an empty one."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    count = min(shards, total)
    size, extra = divmod(total, count) if count else (0, 0)
    specs, offset = [], 0
    for number in range(count):
        length = size + (number < extra)
        specs.append(ShardSpec(number, offset, length))
        offset += length
    return specs


MICRO_USD = 1_000_000  # shares are whole micro-dollars, so adding them up is exact


def split_budget(limit_usd: float, specs: Sequence[ShardSpec]) -> list[float]:
    """Each shard's share of a cost cap, proportional to its records, in whole micro-dollars; never more in
    total than the cap.

    Each shard run enforces its share on its own: a shard cannot borrow what another leaves unspent, so a
    shard of expensive tasks may stop (or be refused up front) while the whole input would have fit the cap.
    """
    if not 0 <= limit_usd < math.inf:
        raise ValueError(f"a cost cap must be a finite amount of at least 0, not {limit_usd!r}")
    total = sum(spec.count for spec in specs)
    if total == 0:
        return [0.0] * len(specs)
    # Exact decimal value of the cap as written (0.3, not 0.29999999999999998890), rounded down to the micro-dollar.
    cap = int(Decimal(repr(limit_usd)) * MICRO_USD)
    shares = [cap * spec.count // total for spec in specs]
    # Rounding each share down leaves fewer micro-dollars than shards: hand them out, largest remainder first.
    by_remainder = sorted(range(len(specs)), key=lambda i: (-(cap * specs[i].count % total), i))
    for i in by_remainder[: cap - sum(shares)]:
        shares[i] += 1
    return [share / MICRO_USD for share in shares]


def split_lines(lines: Sequence[bytes], shards: int) -> list[tuple[ShardSpec, bytes]]:
    """Each shard's JSONL file content, from the input's records as JSONL lines."""
    return [
        (spec, b"".join(line + b"\n" for line in lines[spec.offset : spec.offset + spec.count]))
        for spec in shard_specs(len(lines), shards)
    ]


@dataclass(frozen=True, slots=True)
class ShardOutput:
    """A shard's written output: its summary and its rows (indexes relative to the shard)."""

    spec: ShardSpec
    input_path: str
    summary: RunSummary
    rows: Sequence[TaskResult]


def parse_output(data: bytes) -> tuple[RunSummary, list[TaskResult]]:
    """A run's output file (JSON or JSONL, as `Run.finish` writes them) as its summary and rows."""
    # Both start with one line holding the summary: JSON output is that line alone, with the rows inside it.
    first, _, rest = data.partition(b"\n")
    head = orjson.loads(first)
    rows = head["results"] if "results" in head else [orjson.loads(line) for line in rest.splitlines() if line.strip()]
    return RunSummary.model_validate(head["run"]), [TaskResult.model_validate(row) for row in rows]


def merged_rows(outputs: Sequence[ShardOutput]) -> Iterator[TaskResult]:
    """Every shard's rows in input order, their `index` re-based to the position in the whole input."""
    for output in sorted(outputs, key=lambda o: o.spec.offset):
        if len(output.rows) != output.spec.count:
            raise BatchEngineError(
                f"shard {output.spec.number}: {len(output.rows)} rows for {output.spec.count} records; not merging"
            )
        for row in output.rows:
            yield row.model_copy(update={"index": row.index + output.spec.offset})


def merged_summary(outputs: Sequence[ShardOutput], *, input_path: str, output_path: str) -> ShardedRunSummary:
    """One `run` summary over all shards: counts, tokens and cost summed; batches and shards listed."""
    outputs = sorted(outputs, key=lambda o: o.spec.offset)
    summaries = [o.summary for o in outputs]
    by_route: Counter[Route] = Counter()
    by_status: Counter[Status] = Counter()
    for summary in summaries:
        by_route.update(summary.counts.by_route)
        by_status.update(summary.counts.by_status)
    counts = RunCounts(
        total=sum(s.counts.total for s in summaries),
        succeeded=sum(s.counts.succeeded for s in summaries),
        failed=sum(s.counts.failed for s in summaries),
        rejected=sum(s.counts.rejected for s in summaries),
        invalid_output=sum(s.counts.invalid_output for s in summaries),
        by_route=dict(sorted(by_route.items())),
        by_status=dict(sorted(by_status.items())),
    )
    tokens = TokenTotals()
    for summary in summaries:
        for name in TokenTotals.model_fields:
            setattr(tokens, name, getattr(tokens, name) + getattr(summary.tokens, name))
    spent = sum(s.cost.total_usd for s in summaries)
    baseline = sum(s.cost.baseline_usd for s in summaries)
    prompt = tokens.input + tokens.cache_read + tokens.cache_write
    started = min(s.started_at for s in summaries)
    finished = max(s.finished_at for s in summaries)
    durations = _max_by_key(s.durations_s for s in summaries)
    durations["total"] = round((finished - started).total_seconds(), 3)
    keys = [s.run_key for s in summaries]
    return ShardedRunSummary(
        run_key=hashlib.blake2b("\n".join(keys).encode(), digest_size=10).hexdigest(),
        input_path=input_path,
        output_path=output_path,
        simulated=any(s.simulated for s in summaries),
        started_at=started,
        finished_at=finished,
        counts=counts,
        # Chunk keys restart in every shard: the shard number keeps them apart.
        batches=[
            BatchSummary(id=b.id, chunk=f"s{o.spec.number}/{b.chunk}", status=b.status, request_counts=b.request_counts)
            for o in outputs
            for b in o.summary.batches
        ],
        tokens=tokens,
        cost=CostSummary.of(spent, baseline),
        cache_hit_rate=round(tokens.cache_read / prompt, 4) if prompt else 0.0,
        durations_s=durations,
        shards=[
            ShardRun(
                number=o.spec.number,
                offset=o.spec.offset,
                records=o.spec.count,
                run_key=o.summary.run_key,
                input_path=o.input_path,
                output_path=o.summary.output_path,
            )
            for o in outputs
        ],
    )


def _max_by_key(mappings: Iterable[dict[str, float]]) -> dict[str, float]:
    # Shards run side by side: a phase took as long as its slowest shard.
    merged: dict[str, float] = {}
    for mapping in mappings:
        for key, value in mapping.items():
            merged[key] = max(merged.get(key, 0.0), value)
    return merged

"""The usage log: one SQLite row per billed request (both lanes, every billed attempt), across runs, in the
state directory. `cache-stats`, `report` and the budget's output history read it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path

from batch_engine.config import Config
from batch_engine.models import Usage
from batch_engine.planning import PlannedTask
from batch_engine.planning.outcome import FinishedRow
from batch_engine.planning.params import system_prefix, thinking_label
from batch_engine.planning.pricing import baseline_cost
from batch_engine.state.store import SqliteStore

SCHEMA_VERSION = 1
USAGE_FILE = "usage.sqlite3"

# The output history is the newest observations: enough for a stable 95th percentile, and bounded, so a log of
# months of nightly runs (tens of millions of rows) costs a run's pre-flight a fraction of a second, not gigabytes.
HISTORY_ROWS = 200_000
HISTORY_PER_KEY = 10_000


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One billed request: who, where, how many tokens of each kind, what it cost, how long it took."""

    at: float  # epoch seconds
    run_key: str
    task_id: str
    task_type: str
    route: str  # batch | realtime
    model: str
    status: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    thinking_tokens: int
    cost_usd: float
    baseline_usd: float  # the same tokens realtime, no caching
    latency_s: float | None  # realtime only; a batch row has no per-request latency
    max_tokens: int
    prefix_key: str | None  # digest of the system prompt, whether or not it was marked for caching
    prefix_tokens: int  # estimated tokens of that system prompt
    cache_ttl: str | None  # TTL of the system prompt's breakpoint: "5m", "1h", or None when not marked
    thinking: str | None  # "adaptive:<effort>", "manual:<budget>", or None
    route_reason: str
    # What makes a billed request unique: "batch:<batch id>:<custom_id>", or "request:<request-id>" for realtime.
    # Unique in the log, so re-reading a batch's results after a crash logs nothing twice.
    request_key: str | None = None

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


_COLUMNS = [f.name for f in fields(UsageRecord)]
# `dataclasses.astuple` deep-copies every field: a measurable share of the realtime lane's CPU per request.
_ROW = attrgetter(*_COLUMNS)
_TYPES = {"int": "INTEGER", "float": "REAL", "str": "TEXT"}


def _column(name: str, annotation: str) -> str:
    base = annotation.split("|")[0].strip()
    nullable = "None" in annotation
    return f"{name} {_TYPES[base]}{'' if nullable else ' NOT NULL'}"


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (\n    "
    + ",\n    ".join(_column(f.name, str(f.type)) for f in fields(UsageRecord))
    + "\n);\nCREATE INDEX IF NOT EXISTS usage_by_time ON usage (at);\n"
)
# Logs written before request keys existed get the column; their old rows keep NULL (never a conflict).
_REQUEST_KEY_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS usage_by_request ON usage (request_key)"


class UsageLog(SqliteStore):
    """Append-only log of billed requests."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, SCHEMA_VERSION, "usage log")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(usage)")}
        if "request_key" not in columns:
            self._db.execute("ALTER TABLE usage ADD COLUMN request_key TEXT")
        self._db.execute(_REQUEST_KEY_INDEX)

    @classmethod
    def open(cls, state_dir: Path) -> UsageLog:
        return cls(Path(state_dir) / USAGE_FILE)

    def append(self, records: Iterable[UsageRecord]) -> None:
        """Log billed requests; one already logged under the same request key is left as it is."""
        rows = [_ROW(record) for record in records]
        if rows:
            placeholders = ", ".join("?" * len(_COLUMNS))
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT OR IGNORE INTO usage ({', '.join(_COLUMNS)}) VALUES ({placeholders})", rows)
            self._db.execute("COMMIT")

    def recent_outputs(self, since: float = 0.0, limit: int = HISTORY_ROWS) -> Iterator[tuple[str, str, int]]:
        """(task type, model, output tokens) of the newest `limit` records at or after `since`, newest first,
        read as a stream."""
        query = "SELECT task_type, model, output_tokens FROM usage WHERE at >= ? ORDER BY at DESC LIMIT ?"
        for row in self._db.execute(query, (since, limit)):
            yield row[0], row[1], row[2]

    def records(self, since: float = 0.0, run_key: str | None = None) -> list[UsageRecord]:
        """Records at or after `since` (epoch seconds), optionally of one run, oldest first."""
        query = f"SELECT {', '.join(_COLUMNS)} FROM usage WHERE at >= ?"
        args: list[object] = [since]
        if run_key is not None:
            query += " AND run_key = ?"
            args.append(run_key)
        return [UsageRecord(*row) for row in self._db.execute(query + " ORDER BY at", args)]


def usage_record(
    task: PlannedTask,
    result: FinishedRow,
    run_key: str,
    at: float,
    latency_s: float | None,
    config: Config,
    request_id: str | None = None,
) -> UsageRecord:
    """The usage-log row of a billed result: succeeded, refused, incomplete, or invalid_output (answered, but not
    to the schema); `request_id` is a realtime reply's request-id."""
    usage = result.usage or Usage()
    spec = config.models.get(result.model or task.model) or config.models[task.model]
    prefix_key, prefix_tokens, ttl = system_prefix(task.frame)
    split = usage.cache_write_5m_tokens + usage.cache_write_1h_tokens
    return UsageRecord(
        at=at,
        run_key=run_key,
        task_id=task.task_id,
        task_type=task.task_type,
        route=result.route or task.route,
        model=result.model or task.model,
        status=result.status,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_input_tokens,
        cache_write_5m_tokens=usage.cache_write_5m_tokens if split else usage.cache_creation_input_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        thinking_tokens=usage.thinking_tokens,
        cost_usd=result.cost_usd or 0.0,
        baseline_usd=baseline_cost(usage, spec),
        latency_s=latency_s,
        max_tokens=int(task.frame.get("max_tokens", 0)),
        prefix_key=prefix_key,
        prefix_tokens=prefix_tokens,
        cache_ttl=ttl,
        thinking=thinking_label(task.frame),
        route_reason=task.route_reason,
        request_key=request_key(task, result, request_id),
    )


def request_key(task: PlannedTask, result: FinishedRow, request_id: str | None) -> str | None:
    """The key a billed request is logged under: its batch row, or its realtime request id."""
    if result.batch_id is not None:
        return f"batch:{result.batch_id}:{task.task_id}"
    return None if request_id is None else f"request:{request_id}"


def output_history(
    observations: Iterable[tuple[str, str, int]], quantile: float = 0.95, per_key: int = HISTORY_PER_KEY
) -> dict[tuple[str, str], int]:
    """Per (task type, model): the `quantile` of observed output tokens — the budget's output estimate.

    `observations` are (task type, model, output tokens), newest first; only the first `per_key` of each
    (task type, model) count.
    """
    seen: dict[tuple[str, str], list[int]] = {}
    for task_type, model, tokens in observations:
        values = seen.setdefault((task_type, model), [])
        if len(values) < per_key:
            values.append(tokens)
    history: dict[tuple[str, str], int] = {}
    for key, values in seen.items():
        values.sort()
        history[key] = values[min(len(values) - 1, int(quantile * len(values)))]
    return history


def observations(records: Iterable[UsageRecord]) -> Iterator[tuple[str, str, int]]:
    """`output_history`'s input from records already loaded (newest first)."""
    for record in sorted(records, key=attrgetter("at"), reverse=True):
        yield record.task_type, record.model, record.output_tokens

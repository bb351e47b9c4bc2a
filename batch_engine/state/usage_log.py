"""The usage log: one SQLite row per billed request (both lanes, every billed attempt), across runs, in the
state directory. `cache-stats`, `report` and the budget's output history read it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple

from batch_engine.config import Config
from batch_engine.models import Tokens
from batch_engine.planning import PlannedTask
from batch_engine.planning.outcome import FinishedRow
from batch_engine.planning.params import per_frame, system_prefix, thinking_label
from batch_engine.planning.pricing import baseline_tokens_cost
from batch_engine.state.store import SqliteStore

SCHEMA_VERSION = 1
USAGE_FILE = "usage.sqlite3"

# The output history is the newest observations: enough for a stable 95th percentile, and bounded, so a log of
# months of nightly runs (tens of millions of rows) costs a run's pre-flight a fraction of a second, not gigabytes.
HISTORY_ROWS = 200_000
HISTORY_PER_KEY = 10_000


class UsageRecord(NamedTuple):
    """One billed request: who, where, how many tokens of each kind, what it cost, how long it took.

    A named tuple, not a frozen dataclass: it is the log's row as the database takes it, built once per billed
    request (a million at a nightly job's scale), and a frozen dataclass of 24 fields cost more to build than
    the rest of the row's bookkeeping, and then a copy into a tuple.
    """

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


_COLUMNS = list(UsageRecord._fields)
# Each column's annotation as written (`float | None`): the schema's types and NOT NULLs come from it.
ANNOTATIONS = {name: hint.__forward_arg__ for name, hint in UsageRecord.__annotations__.items()}
_TYPES = {"int": "INTEGER", "float": "REAL", "str": "TEXT"}


def _column(name: str, annotation: str) -> str:
    base = annotation.split("|")[0].strip()
    nullable = "None" in annotation
    return f"{name} {_TYPES[base]}{'' if nullable else ' NOT NULL'}"


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (\n    "
    + ",\n    ".join(_column(name, ANNOTATIONS[name]) for name in _COLUMNS)
    + "\n);\nCREATE INDEX IF NOT EXISTS usage_by_time ON usage (at);\n"
)
# Logs written before request keys existed get the column; their old rows keep NULL (never a conflict).
_REQUEST_KEY_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS usage_by_request ON usage (request_key)"
_INSERT = f"INSERT OR IGNORE INTO usage ({', '.join(_COLUMNS)})"


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
        rows = records if isinstance(records, list) else list(records)
        if rows:
            self._db.execute("BEGIN")
            self._insert_rows(_INSERT, len(_COLUMNS), rows)
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
    # Built once per billed row (a million at a nightly job's scale): the tokens unpacked once, the tuple made in
    # field order (24 keyword arguments cost more than the rest of the row), the baseline as `baseline_cost` adds it.
    input_tokens, output_tokens, cache_read, creation, write_5m, write_1h, thinking_tokens = result.usage or _NO_USAGE
    model = result.model or task.model
    spec = config.models.get(model) or config.models[task.model]
    max_tokens, prefix_key, prefix_tokens, ttl, thinking = _frame_facts(task.frame)
    return UsageRecord._make(
        (
            at,
            run_key,
            task.task_id,
            task.task_type,
            result.route or task.route,
            model,
            result.status,
            input_tokens,
            output_tokens,
            cache_read,
            write_5m if write_5m + write_1h else creation,
            write_1h,
            thinking_tokens,
            result.cost_usd,
            baseline_tokens_cost(input_tokens + cache_read + creation, output_tokens, spec),
            latency_s,
            max_tokens,
            prefix_key,
            prefix_tokens,
            ttl,
            thinking,
            task.route_reason,
            request_key(task, result, request_id),
        )
    )


_NO_USAGE = Tokens()
_FrameFacts = tuple[int, str | None, int, str | None, str | None]


@per_frame
def _frame_facts(frame: dict[str, Any]) -> _FrameFacts:
    """(max_tokens, system prompt digest, its tokens, its breakpoint TTL, thinking label) of a request's frame: tasks
    that render alike share one frame object, so its prompt is looked at once, not once per billed row."""
    return (int(frame.get("max_tokens", 0)), *system_prefix(frame), thinking_label(frame))


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

"""The state backend interface: what the engine needs of a run ledger and of a usage log, whichever database
keeps them, and `open_ledger` / `open_usage_log` choosing the implementation from a state URL.

SQLite (`batch_engine.state.ledger`, `batch_engine.state.usage_log`) is the default for one machine; PostgreSQL
(`batch_engine.state.pg_ledger`, `batch_engine.state.pg_usage_log`) is for several workers sharing one state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol, Self

from batch_engine.models import TaskResult
from batch_engine.planning.outcome import FinishedRow
from batch_engine.state.ledger import ChunkRecord, ChunkStatus, Lease, RunRecord, RunStatus
from batch_engine.state.url import StateUrl
from batch_engine.state.usage_log import UsageRecord


class RunLedger(Protocol):
    """The run ledger: runs, their lease, chunk intents and batch ids, and every finished task's row."""

    @property
    def where(self) -> str:
        """Where the ledger is, as it may be printed (a file path, or a database URL without its password)."""
        ...

    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def begin(
        self, run_key: str, input_path: str, output_path: str, options: dict[str, Any], now: float
    ) -> RunRecord: ...
    def run(self, run_key: str) -> RunRecord | None: ...
    def runs(self, status: RunStatus | None = None) -> list[RunRecord]: ...
    def has_work(self, run_key: str) -> bool: ...
    def supersede(self, old_key: str, new_key: str, unchanged: set[int], finished_at: float) -> list[str]: ...
    def set_run_status(self, run_key: str, status: RunStatus, finished_at: float | None = None) -> None: ...
    def keep_durations(self, run_key: str, durations: dict[str, Any]) -> dict[str, Any]: ...

    def take_lease(self, lease: Lease, holder_alive: Callable[[Lease], bool]) -> Lease | None: ...
    def lease(self, run_key: str) -> Lease | None: ...
    def lease_alive(self, held: Lease, holder_alive: Callable[[Lease], bool]) -> bool: ...
    def renew_lease(self, run_key: str, owner: str, now: float, expires_at: float) -> bool: ...
    def release_lease(self, run_key: str, owner: str) -> None: ...

    def chunks(self, run_key: str) -> list[ChunkRecord]: ...
    def chunk(self, run_key: str, chunk_key: str) -> ChunkRecord | None: ...
    def record_intent(self, run_key: str, chunk_key: str, task_indexes: Iterable[int], now: float) -> ChunkRecord: ...
    def record_send(self, run_key: str, chunk_key: str, now: float) -> None: ...
    def record_batch(self, run_key: str, chunk_key: str, batch_id: str, created_at: float) -> None: ...
    def update_chunk(
        self,
        run_key: str,
        chunk_key: str,
        *,
        status: ChunkStatus | None = None,
        request_counts: dict[str, int] | None = None,
        canceled_by_us: bool | None = None,
    ) -> None: ...
    def chunk_by_batch(self, batch_id: str) -> ChunkRecord | None: ...
    def known_batch_ids(self) -> set[str]: ...

    def save_results(self, run_key: str, results: Iterable[FinishedRow], now: float) -> None: ...
    def spent(self, run_key: str) -> float: ...
    def last_recorded(self, run_key: str) -> dict[str, float]: ...
    def finished_indexes(self, run_key: str) -> set[int]: ...
    def iter_finished_indexes(self, run_key: str) -> Iterator[int]: ...
    def results(self, run_key: str) -> Iterator[TaskResult]: ...
    def invalid_outputs(self, run_key: str, indexes: Iterable[int] | None = None) -> list[TaskResult]: ...
    def result_json(self, run_key: str) -> Iterator[tuple[int, bytes]]: ...


class UsageStore(Protocol):
    """The usage log: one row per billed request, across runs; append-only, keyed by request key."""

    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
    def append(self, records: Iterable[UsageRecord]) -> None: ...
    def recent_outputs(self, since: float = 0.0, limit: int = ...) -> Iterator[tuple[str, str, int]]: ...
    def records(self, since: float = 0.0, run_key: str | None = None) -> list[UsageRecord]: ...


def open_ledger(state: StateUrl) -> RunLedger:
    """The run ledger at `state` (created, or migrated to this version, on first use)."""
    if state.dsn is not None:
        from batch_engine.state.pg_ledger import PgLedger

        return PgLedger.connect(state.dsn)
    from batch_engine.state.ledger import Ledger

    assert state.directory is not None
    return Ledger.open(state.directory)


def open_usage_log(state: StateUrl) -> UsageStore:
    """The usage log at `state` (created on first use)."""
    if state.dsn is not None:
        from batch_engine.state.pg_usage_log import PgUsageLog

        return PgUsageLog.connect(state.dsn)
    from batch_engine.state.usage_log import UsageLog

    assert state.directory is not None
    return UsageLog.open(state.directory)


def usage_log_exists(state: StateUrl) -> bool:
    """Whether a usage log was written at `state` (a database always has one once a run used it)."""
    if state.dsn is not None:
        return True
    from batch_engine.state.usage_log import USAGE_FILE

    assert state.directory is not None
    return (state.directory / USAGE_FILE).exists()


def ledger_exists(state: StateUrl) -> bool:
    if state.dsn is not None:
        return True
    from batch_engine.state.ledger import LEDGER_FILE

    assert state.directory is not None
    return (state.directory / LEDGER_FILE).exists()

"""Message Batches bookkeeping: lifecycle, request_counts, listing, and lazy row-by-row processing.

Rows fall due evenly over the batch's duration on the emulator clock and are answered in slices by one
background loop (never one task per row), so a 100,000-row batch costs one list and a cursor. Until a batch
ends every request counts as `processing`, as the API reports it; results are shuffled when it ends.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from batch_engine.emulator.catalog import OLDEST_VERSION
from batch_engine.emulator.rows import PackedRows
from batch_engine.emulator.spool import ResultSpool
from batch_engine.emulator.wire import ApiFailure, invalid, new_id, rfc3339

EXPIRY_S = 24 * 3600.0
RESULTS_RETENTION_S = 29 * 24 * 3600.0
OUTCOMES = ("succeeded", "errored", "canceled", "expired")

# Answers row `index` of a batch: returns its JSONL result line and its outcome (one of OUTCOMES).
RowAnswer = Callable[["Batch", int], tuple[bytes, str]]


@dataclass(frozen=True, slots=True)
class RowFaults:
    """Fault settings captured when the batch is created, so later config changes do not rewrite it."""

    error_rate: float = 0.0
    error_type: str = "api_error"
    expire_rate: float = 0.0
    never_ends: bool = False


@dataclass(slots=True)
class Batch:
    id: str
    created_at: float
    duration_s: float
    custom_ids: list[str]
    rows: PackedRows | None  # the params of rows not yet answered; None once the batch ends
    faults: RowFaults
    api_version: str
    next_row: int = 0
    status: str = "in_progress"
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    spool: ResultSpool = field(default_factory=ResultSpool)

    @property
    def expires_at(self) -> float:
        return self.created_at + EXPIRY_S

    @property
    def size(self) -> int:
        return len(self.custom_ids)

    def due_rows(self, now: float) -> int:
        if self.faults.never_ends:
            return 0
        elapsed = now - self.created_at
        if elapsed >= self.duration_s:
            return self.size
        return min(self.size, int(self.size * elapsed / self.duration_s))

    def archived(self, now: float) -> bool:
        return now >= self.created_at + RESULTS_RETENTION_S

    def to_json(self, base_url: str, now: float) -> dict[str, Any]:
        ended = self.status == "ended"
        counts = dict(self.counts) if ended else {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        archived = self.archived(now)
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": {"processing": 0 if ended else self.size, **counts},
            "ended_at": rfc3339(self.ended_at) if self.ended_at is not None else None,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "archived_at": rfc3339(self.created_at + RESULTS_RETENTION_S) if archived else None,
            "cancel_initiated_at": rfc3339(self.cancel_initiated_at) if self.cancel_initiated_at else None,
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended and not archived else None,
        }

    def advance(self, now: float, answer: RowAnswer, budget: int, seed: int) -> int:
        """Answer up to `budget` due rows and end the batch when it is done; return rows answered."""
        if self.status == "ended":
            return 0
        if now >= self.expires_at:
            self._finish("expired", now, seed)
            return 0
        if self.status == "canceling":
            self._finish("canceled", now, seed)
            return 0
        stop = min(self.due_rows(now), self.next_row + budget)
        done = 0
        while self.next_row < stop:
            line, outcome = answer(self, self.next_row)
            self.spool.append(line)
            self.counts[outcome] += 1
            self.next_row += 1
            done += 1
        if self.next_row == self.size and now >= self.created_at + self.duration_s:
            self._finish(None, now, seed)
        return done

    def _finish(self, unfinished_as: str | None, now: float, seed: int) -> None:
        if unfinished_as is not None:
            for index in range(self.next_row, self.size):
                line = {"custom_id": self.custom_ids[index], "result": {"type": unfinished_as}}
                self.spool.append(orjson.dumps(line))
            self.counts[unfinished_as] += self.size - self.next_row
            self.next_row = self.size
        # Results come back in no particular order; clients must join on custom_id.
        self.spool.shuffle(random.Random(f"{seed}:{self.id}"))
        self.rows = None
        self.status = "ended"
        self.ended_at = now

    def results(self) -> Iterator[bytes]:
        return self.spool.lines()

    def close(self) -> None:
        """Give back the disk space of the results (the batch is deleted)."""
        self.spool.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "duration_s": self.duration_s,
            "custom_ids": self.custom_ids,
            "params": None if self.rows is None else [self.rows.params(index) for index in range(len(self.rows))],
            "faults": [
                self.faults.error_rate,
                self.faults.error_type,
                self.faults.expire_rate,
                self.faults.never_ends,
            ],
            "api_version": self.api_version,
            "next_row": self.next_row,
            "status": self.status,
            "ended_at": self.ended_at,
            "cancel_initiated_at": self.cancel_initiated_at,
            "counts": self.counts,
            "lines": [line.decode() for line in self.spool.lines()],
        }

    @classmethod
    def restore(cls, data: dict[str, Any]) -> Batch:
        error_rate, error_type, expire_rate, never_ends = data["faults"]
        rows = None
        if data["params"] is not None:
            rows = PackedRows()
            for params in data["params"]:
                rows.append(params)
        return cls(
            id=data["id"],
            created_at=data["created_at"],
            duration_s=data["duration_s"],
            custom_ids=data["custom_ids"],
            rows=rows,
            faults=RowFaults(error_rate, error_type, expire_rate, never_ends),
            api_version=data.get("api_version", OLDEST_VERSION),
            next_row=data["next_row"],
            status=data["status"],
            ended_at=data["ended_at"],
            cancel_initiated_at=data["cancel_initiated_at"],
            counts=data["counts"],
            spool=ResultSpool(line.encode() for line in data["lines"]),
        )


class BatchStore:
    """All batches, in creation order."""

    def __init__(self) -> None:
        self._batches: dict[str, Batch] = {}
        self._order: list[str] = []

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, batch: Batch) -> None:
        self._batches[batch.id] = batch
        self._order.append(batch.id)

    def create(
        self,
        custom_ids: list[str],
        rows: PackedRows,
        now: float,
        duration_s: float,
        faults: RowFaults,
        api_version: str,
    ) -> Batch:
        batch = Batch(new_id("msgbatch_"), now, duration_s, custom_ids, rows, faults, api_version)
        self.add(batch)
        return batch

    def get(self, batch_id: str) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise ApiFailure("not_found_error", f"message_batch_id: no batch {batch_id!r}")
        return batch

    def delete(self, batch_id: str) -> None:
        batch = self.get(batch_id)
        if batch.status != "ended":
            raise invalid(
                f"Message Batch {batch_id} cannot be deleted while it is {batch.status}; "
                "cancel it and wait for it to end first."
            )
        del self._batches[batch_id]
        self._order.remove(batch_id)
        batch.close()

    def active(self) -> list[Batch]:
        return [batch for batch in self._batches.values() if batch.status != "ended"]

    def all(self) -> list[Batch]:
        return [self._batches[batch_id] for batch_id in self._order]

    def page(self, limit: int, after_id: str | None, before_id: str | None) -> tuple[list[Batch], bool]:
        """Newest first; `after_id` pages towards older batches, `before_id` towards newer ones."""
        newest_first = self._order[::-1]
        if after_id is not None and before_id is not None:
            raise invalid("after_id and before_id cannot be used together")
        if after_id is not None:
            rest = newest_first[self._position(newest_first, after_id, "after_id") + 1 :]
            chosen, has_more = rest[:limit], len(rest) > limit
        elif before_id is not None:
            rest = newest_first[: self._position(newest_first, before_id, "before_id")]
            chosen, has_more = rest[-limit:], len(rest) > limit
        else:
            chosen, has_more = newest_first[:limit], len(newest_first) > limit
        return [self._batches[batch_id] for batch_id in chosen], has_more

    @staticmethod
    def _position(ids: list[str], batch_id: str, name: str) -> int:
        try:
            return ids.index(batch_id)
        except ValueError:
            raise invalid(f"{name}: no batch {batch_id!r}") from None

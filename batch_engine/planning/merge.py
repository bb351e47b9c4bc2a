"""Pure: the output rows in input order — the run's finished rows (as the ledger streams them, by index) merged
with the rows of the rejected records. What `Run.rows` and `Run.row_json` write."""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable, Iterator
from typing import TypeVar

from batch_engine.models import Rejection, TaskResult

Row = TypeVar("Row")


def rejection_result(rejection: Rejection) -> TaskResult:
    """The output row of a rejected record."""
    return TaskResult(
        task_id=rejection.task_id,
        index=rejection.index,
        status="rejected",
        error={"type": "rejected", "message": rejection.one_line()},
    )


def in_input_order(finished: Iterable[tuple[int, Row]], rejections: Iterable[Rejection]) -> Iterator[Row | TaskResult]:
    """One row per record, in input order: `finished` (index, row) pairs in index order, merged as a stream (a
    run's million rows are never all in memory) with the rejected records' rows, which may come in any order."""
    rejected: list[tuple[int, Row | TaskResult]] = sorted(
        ((r.index, rejection_result(r)) for r in rejections), key=_index
    )
    rows: Iterable[tuple[int, Row | TaskResult]] = finished
    if not rejected:
        # The usual case: nothing to merge. Each row taken from its pair in C: a heap, or a generator frame, per
        # row was a share of writing the output.
        return map(_row, rows)
    return map(_row, heapq.merge(rows, rejected, key=_index))


_index = operator.itemgetter(0)
_row = operator.itemgetter(1)

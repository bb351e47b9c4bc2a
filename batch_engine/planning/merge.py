"""Merge results arriving in any order, plus rejections, back into input order."""

from __future__ import annotations

from collections.abc import Iterable

from batch_engine.models import Rejection, TaskResult


def rejection_result(rejection: Rejection) -> TaskResult:
    """The output row of a rejected record."""
    return TaskResult(
        task_id=rejection.task_id,
        index=rejection.index,
        status="rejected",
        error={"type": "rejected", "message": rejection.one_line()},
    )


def merge(results: Iterable[TaskResult], rejections: Iterable[Rejection]) -> list[TaskResult]:
    """One row per input record, in input order; a later result for the same record replaces an earlier one."""
    by_index: dict[int, TaskResult] = {}
    for rejection in rejections:
        by_index[rejection.index] = rejection_result(rejection)
    for result in results:
        by_index[result.index] = result
    return [by_index[index] for index in sorted(by_index)]

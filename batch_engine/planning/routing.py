"""Routing: batch or realtime per task, each decision with its reason."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

from batch_engine.config import Route, TaskType
from batch_engine.models import TaskRequest


def route_task(task: TaskRequest, task_type: TaskType, now: datetime, batch_sla_s: float) -> tuple[Route, str]:
    """Explicit mode wins; a deadline sooner than the batch SLA forces realtime; else the task type's default."""
    if task.mode != "auto":
        return task.mode, f"mode={task.mode} set on the task"
    if task.max_latency_s is not None and task.max_latency_s < batch_sla_s:
        return "realtime", f"max_latency_s={task.max_latency_s:g} is below the batch SLA of {batch_sla_s:g}s"
    if task.deadline is not None:
        deadline = task.deadline if task.deadline.tzinfo else task.deadline.replace(tzinfo=UTC)
        left = (deadline - now).total_seconds()
        if left < batch_sla_s:
            return "realtime", f"deadline in {left:.0f}s is sooner than the batch SLA of {batch_sla_s:g}s"
    return task_type.mode, _default_reason(task.task_type, task_type.mode)


@functools.lru_cache(maxsize=256)
def _default_reason(task_type: str, mode: Route) -> str:
    # One string per task type, not one per task (most tasks take their type's default).
    return f"task type {task_type} defaults to {mode}"

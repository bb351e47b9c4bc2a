"""Pure planning core: routing, params, chunking, pricing, merge. No network, no files, no clock.

The types below are the contract between planning and the lanes that execute a plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batch_engine.config import Route
from batch_engine.models import Rejection


@dataclass(frozen=True, slots=True)
class PlannedTask:
    """A validated task with its route decided and its Messages API params rendered."""

    index: int  # 0-based position of the record in the input file
    task_id: str
    task_type: str
    route: Route
    route_reason: str
    model: str
    params: dict[str, Any]  # ready for messages.create / a batch row's params (never contains "stream")
    estimated_input_tokens: int
    cache_key: str | None  # digest of the cacheable prefix; rows sharing it are kept adjacent in batches
    stream: bool  # send with messages.stream on the realtime lane
    metadata: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Chunk:
    """One future batch: positions into Plan.tasks (not input indexes) and the serialized size."""

    number: int
    task_positions: tuple[int, ...]
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: tuple[PlannedTask, ...]  # valid tasks, in input order
    rejections: tuple[Rejection, ...]
    chunks: tuple[Chunk, ...]  # covers exactly the batch-route tasks
    total_records: int

    def batch_tasks(self) -> list[PlannedTask]:
        return [task for task in self.tasks if task.route == "batch"]

    def realtime_tasks(self) -> list[PlannedTask]:
        return [task for task in self.tasks if task.route == "realtime"]

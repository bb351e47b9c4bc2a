"""Split batch rows into batches within the API's request-count and byte limits."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from batch_engine.planning import Chunk, PlannedTask
from batch_engine.planning.rows import RowEncoder

# {"custom_id":"…","params":…} plus the comma between rows and the {"requests":[…]} envelope.
_ENVELOPE_BYTES = len(b'{"requests":[]}')


def row_bytes(task: PlannedTask) -> int:
    """Serialized size of the task's batch row."""
    return len(orjson.dumps({"custom_id": task.task_id, "params": task.params})) + 1


def chunk_tasks(
    tasks: Sequence[PlannedTask],
    max_requests: int,
    max_bytes: int,
    positions: Sequence[int] | None = None,
    encoder: RowEncoder | None = None,
) -> list[Chunk]:
    """Deterministic chunks; rows sharing a cache prefix are kept adjacent so batch cache hits are likely.

    `positions` are the indexes of `tasks` to chunk (default: all). A single row larger than `max_bytes`
    still gets a chunk of its own; the API will reject it with 413 rather than the planner dropping it.
    """
    order = list(range(len(tasks)) if positions is None else positions)
    first_seen: dict[str | None, int] = {}
    for pos in order:
        first_seen.setdefault(tasks[pos].cache_key, pos)
    # Stable sort: groups in order of first appearance, input order inside a group.
    order.sort(key=lambda pos: first_seen[tasks[pos].cache_key])

    encoder = encoder or RowEncoder()
    chunks: list[Chunk] = []
    current: list[int] = []
    size = _ENVELOPE_BYTES
    for pos in order:
        nbytes = encoder.size(tasks[pos]) + 1  # the row and its comma
        if current and (len(current) >= max_requests or size + nbytes > max_bytes):
            chunks.append(Chunk(number=len(chunks), task_positions=tuple(current), size_bytes=size))
            current, size = [], _ENVELOPE_BYTES
        current.append(pos)
        size += nbytes
    if current:
        chunks.append(Chunk(number=len(chunks), task_positions=tuple(current), size_bytes=size))
    return chunks

"""What identifies a run: the input and the requests it would send (each task's rendered params, its route and
how the batch rows are grouped), not prices, date stamps, unused task types or the package version.

A re-run that would send the same requests is the same run (it re-attaches to its batches); one that would send
other requests is another run. Pure: data in, digests out.
"""

from __future__ import annotations

import hashlib

import orjson

from batch_engine.planning import Plan, PlannedTask


def _digest(*parts: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


def request_digests(plan: Plan) -> dict[int, bytes]:
    """Input index → digest of the request its task sends (task id, route, streaming, rendered params)."""
    frames: dict[int, bytes] = {}  # tasks rendered alike share one frame object: serialize it once

    def frame_digest(task: PlannedTask) -> bytes:
        key = id(task.frame)
        found = frames.get(key)
        if found is None:
            found = frames[key] = _digest(orjson.dumps(task.frame, option=orjson.OPT_SORT_KEYS))
        return found

    return {
        task.index: _digest(
            task.task_id.encode(),
            task.route.encode(),
            b"stream" if task.stream else b"",
            frame_digest(task),
            b"\x00" if task.user_text is None else task.user_text.encode(),
        )
        for task in plan.tasks
    }


def run_identity(input_digest: str, plan: Plan, digests: dict[int, bytes] | None = None) -> str:
    """The run key: the input's digest, every task's request digest, and the batch chunks they form."""
    digests = request_digests(plan) if digests is None else digests
    whole = hashlib.blake2b(digest_size=10)
    whole.update(input_digest.encode())
    for task in plan.tasks:
        whole.update(task.index.to_bytes(8, "little"))
        whole.update(digests[task.index])
    for chunk in plan.chunks:
        whole.update(b"|" + b",".join(str(plan.tasks[pos].index).encode() for pos in chunk.task_positions))
    return whole.hexdigest()

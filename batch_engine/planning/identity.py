"""What identifies a run: the input and the requests it would send (each task's rendered params, its route and
how the batch rows are grouped), not prices, date stamps, unused task types or the package version.

A re-run that would send the same requests is the same run (it re-attaches to its batches); one that would send
other requests is another run. Pure: data in, digests out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import orjson

from batch_engine.planning import Plan, PlannedTask


def _framed(part: bytes) -> bytes:
    # Each part after its length: the framing every digest here hashes, so run keys stay what earlier versions
    # computed.
    return len(part).to_bytes(8, "little") + part


def _digest(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(map(_framed, parts)), digest_size=16).digest()


def iter_request_digests(plan: Plan) -> Iterator[tuple[int, bytes]]:
    """(input index, digest of the request its task sends: task id, route, streaming, rendered params), in plan
    order."""
    # Tasks rendered alike share one frame object: its middle part (route, streaming, the frame's digest, each
    # after its length) is framed once, not per task. Raw params are a frame per task: not kept.
    middles: dict[tuple[int, str, bool], bytes] = {}

    def middle(task: PlannedTask) -> bytes:
        frame = _digest(orjson.dumps(task.frame, option=orjson.OPT_SORT_KEYS))
        return _framed(task.route.encode()) + _framed(b"stream" if task.stream else b"") + _framed(frame)

    for task in plan.tasks:
        if task.user_text is None:
            shared, user = middle(task), b"\x00"
        else:
            key = (id(task.frame), task.route, task.stream)
            shared = middles.get(key) or middles.setdefault(key, middle(task))
            user = task.user_text.encode()
        # `_digest(task id, route, stream, frame, user)`, its shared middle framed once.
        framed = _framed(task.task_id.encode()) + shared + _framed(user)
        yield task.index, hashlib.blake2b(framed, digest_size=16).digest()


def request_digests(plan: Plan) -> dict[int, bytes]:
    """Input index → digest of the request its task sends."""
    return dict(iter_request_digests(plan))


def run_identity(input_digest: str, plan: Plan) -> str:
    """The run key: the input's digest, every task's request digest, and the batch chunks they form. Streamed:
    a dict of a million digests was ~150 MiB at the run's peak."""
    whole = hashlib.blake2b(digest_size=10)
    whole.update(input_digest.encode())
    for index, digest in iter_request_digests(plan):
        whole.update(index.to_bytes(8, "little"))
        whole.update(digest)
    for chunk in plan.chunks:
        whole.update(b"|" + b",".join(str(plan.tasks[pos].index).encode() for pos in chunk.task_positions))
    return whole.hexdigest()

"""Planning a large JSONL file on two cores: this process plans the first half while a worker process (this
module, run as `python -m batch_engine.parallel_plan`) plans the second; the halves are joined as if one
process had read the file (the same tasks, rejections, warnings and chunks: a test compares them).

Planning is most of a large run's start-up (~45 µs a task, a minute of one core at a million tasks) and nothing
else runs while it does. The worker sends its tasks as tuples of their fields, in blocks, each distinct frame
(the params around the user message, with its ~5 KB system prompt) once: tasks that render alike share one frame
object in the worker, and share one here too.

Whenever the halves cannot be joined as one (a task_id in both halves, the worker failing), the whole file is
planned here instead: the plan never depends on how it was made.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from batch_engine.config import Config, Route
from batch_engine.files import JsonlSplit, iter_jsonl_part, iter_records, split_jsonl
from batch_engine.planning import Plan, PlannedPart, PlannedTask, join_parts, make_plan, plan_records

log = logging.getLogger("batch_engine")

# Smaller files are planned in this process: a worker takes ~1 s to start, ~20k tasks' planning.
PARALLEL_MIN_BYTES = 32 << 20
_BLOCK_TASKS = 10_000  # tasks per message from the worker
WORKER = __name__  # the module the worker process runs
_LENGTH = struct.Struct("<Q")


def plan_file(
    path: Path,
    config: Config,
    now: datetime,
    route: Route | None = None,
    on_batch_work: Callable[[], None] | None = None,
    min_bytes: int = PARALLEL_MIN_BYTES,
) -> Plan:
    """`make_plan(iter_records(path), ...)`, on two processes when `path` is a JSONL file of `min_bytes` or more."""
    split = split_jsonl(path, min_bytes) if (os.cpu_count() or 1) > 1 else None
    if split is None:
        return make_plan(iter_records(path), config, now, route, on_batch_work)
    called = False

    def batch_work() -> None:
        nonlocal called
        called = True
        if on_batch_work is not None:
            on_batch_work()

    with _Worker(path, split, config, now, route) as worker:
        first = plan_records(iter_jsonl_part(path, split, second=False), config, now, route, batch_work)
        second = worker.result()
    if second is None or not _disjoint(first, second):
        return make_plan(iter_records(path), config, now, route, on_batch_work)
    if not called and any(task.route == "batch" for task in second.tasks):
        batch_work()
    return join_parts([first, second], config)


def _disjoint(first: PlannedPart, second: PlannedPart) -> bool:
    """Whether no task_id is in both parts: a repeat is rejected where it comes second, which only a plan of the
    whole file in one pass numbers and words exactly as `make_plan` does."""
    seen = {task.task_id for task in first.tasks}
    return not any(task.task_id in seen for task in second.tasks)


class _Worker:
    """The worker process planning the second half; `result()` is its part, or None when it failed (said in a
    warning). Killed on exit if still running: it never outlives the plan."""

    def __init__(self, path: Path, split: JsonlSplit, config: Config, now: datetime, route: Route | None) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the worker, in __exit__)
        self._process = subprocess.Popen(
            [sys.executable, "-m", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self._process.stdin is not None
        job = (str(path), split, config, now, route)
        try:
            self._process.stdin.write(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
            self._process.stdin.close()
        except OSError:
            pass  # it died at start: `result()` says why

    def result(self) -> PlannedPart | None:
        assert self._process.stdout is not None
        try:
            part = _read_part(self._process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError) as exc:
            part, error = None, f"{type(exc).__name__}: {exc}"
        code = self._process.wait()
        if part is not None and code == 0:
            return part
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else (error if part is None else f"exit status {code}")
        log.warning("planning: the second process failed (%s); planning the whole file here", reason)
        return None

    def __enter__(self) -> _Worker:
        return self

    def __exit__(self, *_: object) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()


# --- the wire between the worker and this process ---------------------------------------------------------------
# Messages are length-prefixed pickles: ("tasks", {number: frame or output spec first sent here}, [task rows]), then
# ("end", rejections, capped, records read). A task row is its fields in order, its frame and output spec by number.


def _write_part(part: PlannedPart, out: IO[bytes]) -> None:
    numbers: dict[int, tuple[object, int]] = {}  # id → (the object, held so its id stays its own; its number)

    def number(shared: object, new: dict[int, object]) -> int:
        entry = numbers.get(id(shared))
        if entry is None:
            entry = numbers[id(shared)] = (shared, len(numbers))
            new[entry[1]] = shared
        return entry[1]

    for start in range(0, len(part.tasks), _BLOCK_TASKS):
        new: dict[int, object] = {}
        rows = [
            (
                t.index,
                t.task_id,
                t.task_type,
                t.route,
                t.route_reason,
                t.model,
                number(t.frame, new),
                t.user_text,
                t.estimated_input_tokens,
                t.cache_key,
                t.stream,
                t.metadata_json,
                None if t.output is None else number(t.output, new),
            )
            for t in part.tasks[start : start + _BLOCK_TASKS]
        ]
        _write_message(out, ("tasks", new, rows))
    _write_message(out, ("end", part.rejections, part.capped, part.total))


def _write_message(out: IO[bytes], message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_LENGTH.pack(len(data)))
    out.write(data)


def _read_part(stream: IO[bytes]) -> PlannedPart:
    shared: dict[int, Any] = {}
    tasks: list[PlannedTask] = []
    intern = sys.intern
    for message in _messages(stream):
        if message[0] == "end":
            _, rejections, capped, total = message
            return PlannedPart(tasks, rejections, capped, total)
        _, new, rows = message
        shared.update(new)
        tasks.extend(
            # The strings every task of a kind shares are interned, as planning here interns them.
            PlannedTask(
                i,
                tid,
                intern(kind),
                route,
                intern(why),
                intern(model),
                shared[frame],
                text,
                tokens,
                cache_key,
                stream_,
                metadata,
                None if output is None else shared[output],
            )
            for i, tid, kind, route, why, model, frame, text, tokens, cache_key, stream_, metadata, output in rows
        )
    raise EOFError("the second process ended before its last message")


def _messages(stream: IO[bytes]) -> Iterator[tuple[Any, ...]]:
    while header := stream.read(_LENGTH.size):
        if len(header) < _LENGTH.size:
            raise EOFError("a message cut short")
        (size,) = _LENGTH.unpack(header)
        data = stream.read(size)
        if len(data) < size:
            raise EOFError("a message cut short")
        message: tuple[Any, ...] = pickle.loads(data)
        yield message


def _main() -> None:
    path, split, config, now, route = pickle.load(sys.stdin.buffer)
    part = plan_records(iter_jsonl_part(Path(path), split, second=True), config, now, route)
    _write_part(part, sys.stdout.buffer)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    _main()

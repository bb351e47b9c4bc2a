"""A batch row's exact JSON bytes (`{"custom_id": ..., "params": ...}`), with each distinct frame encoded once.

Tasks that render the same frame share it (the params around the user message: model, max_tokens, the ~5 KB
system prompt, thinking). Encoding the whole params per row serialized that prompt once per task, twice (for the
chunk sizes, then for the upload): at 900k batch rows, most of the CPU of producing the `batches.create` bodies.
Here a frame is encoded once, split where its user message goes, and each row is its custom_id and user message
spliced in: the same bytes `orjson.dumps({"custom_id": ..., "params": task.params})` gives (a test checks).
"""

from __future__ import annotations

from typing import Any

import orjson

from batch_engine.planning import PlannedTask

# The frame's placeholder for the user message (`with_user_text` fills it). It follows `model` and `max_tokens`,
# so its first occurrence is the frame's own key: inside a JSON string every quote is escaped.
_PLACEHOLDER = b',"messages":null'


_ROW_START = b'{"custom_id":'
_MESSAGE_START = b'[{"role":"user","content":'
_ROW_END = b"}]"  # the message's closing brace and bracket; the row's own closing brace follows the frame's tail
_FIXED = len(_ROW_START) + len(_MESSAGE_START) + len(_ROW_END) + 1


class RowEncoder:
    """Encodes batch rows; remembers each frame it has seen (a plan holds a handful of distinct frames)."""

    def __init__(self) -> None:
        # id(frame) → (the frame, kept so the id stays its own; the bytes from "params" to the user message; the
        # bytes after it)
        self._frames: dict[int, tuple[dict[str, Any], bytes, bytes]] = {}

    def _parts(self, frame: dict[str, Any]) -> tuple[bytes, bytes]:
        found = self._frames.get(id(frame))
        if found is None:
            head, placeholder, tail = orjson.dumps(frame).partition(_PLACEHOLDER)
            if not placeholder:
                raise ValueError("a frame without its messages placeholder")
            found = self._frames[id(frame)] = (frame, b',"params":' + head + b',"messages":', tail)
        return found[1], found[2]

    def row(self, task: PlannedTask) -> bytes:
        """The task's batch row, as `orjson.dumps({"custom_id": task.task_id, "params": task.params})`."""
        if task.user_text is None:  # raw params: the frame is the whole, and its own
            return orjson.dumps({"custom_id": task.task_id, "params": task.frame})
        middle, tail = self._parts(task.frame)
        parts = (_ROW_START, orjson.dumps(task.task_id), middle, _MESSAGE_START, orjson.dumps(task.user_text))
        return b"".join((*parts, _ROW_END, tail, b"}"))

    def size(self, task: PlannedTask) -> int:
        """len(row(task)), without building it for a templated task."""
        if task.user_text is None:
            return len(self.row(task))
        middle, tail = self._parts(task.frame)
        return _FIXED + len(orjson.dumps(task.task_id)) + len(middle) + len(orjson.dumps(task.user_text)) + len(tail)

"""Batch rows from the create body to the moment they are answered, in little memory.

A million-row job sends batches of ~45k rows of ~5 KB each, almost all of it the same system prompt. The create
body is split into rows without building the whole body's parse tree when it has the usual layout, and each row
waits as JSON bytes, with the large values many rows repeat (system, tools) kept once per batch.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# Top-level values at least this long are shared between the rows of a batch that repeat them.
SHARED_MIN_BYTES = 256
_ROW_START = b'{"custom_id"'
_HEAD = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"requests"[ \t\n\r]*:[ \t\n\r]*\[[ \t\n\r]*')
_WHITESPACE = b" \t\n\r"  # JSON's whitespace (RFC 8259), narrower than regex \s


def split_rows(body: bytes | bytearray) -> list[memoryview] | None:
    """The `requests` items of a create body as separate JSON texts, or None when the whole body must be parsed.

    The body is cut before every `{"custom_id"`: outside a string that begins an object, and inside one it cannot
    occur (a quote there is escaped). A cut inside a row (a nested object whose first key is `custom_id`) leaves
    a piece that is not one JSON value, which the caller finds when it parses the piece; any other layout
    (`params` first, more top-level keys) gives None here. Either way the caller then parses the whole body.
    """
    head = _HEAD.match(body)
    if head is None or not body.startswith(_ROW_START, head.end()):
        return None
    starts = []
    position = head.end()
    while position >= 0:
        starts.append(position)
        position = body.find(_ROW_START, position + 1)
    view = memoryview(body)
    pieces = []
    last_end = _before(body, len(body), starts[-1], b"}")
    last_end = _before(body, last_end, starts[-1], b"]") if last_end is not None else None
    for start, end in zip(starts, [*starts[1:], last_end], strict=True):
        end = _before(body, end, start, b",") if end != last_end else end
        if end is None:
            return None
        pieces.append(view[start:end])
    return pieces


def _before(body: bytes | bytearray, end: int | None, start: int, mark: bytes) -> int | None:
    """Where `mark` sits at the end of body[start:end] (whitespace around it skipped), the whitespace before
    it skipped too; None when it is not there."""
    if end is None:
        return None
    while end > start and body[end - 1] in _WHITESPACE:
        end -= 1
    if end <= start or body[end - 1] != mark[0]:
        return None
    end -= 1
    while end > start and body[end - 1] in _WHITESPACE:
        end -= 1
    return end


def _exact(raw: bytes) -> bytes:
    """A copy of `raw` in an allocation of its own size: orjson's output keeps its whole write buffer (4 KB at
    least), which held per row would cost more than the row."""
    return bytes(memoryview(raw))


class PackedRows:
    """The params of a batch's rows as JSON bytes, large repeated values stored once; a row is freed when taken."""

    def __init__(self) -> None:
        self._rows: list[tuple[bytes, tuple[tuple[str, bytes], ...]] | None] = []
        self._shared: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, params: dict[str, Any] | None) -> None:
        """Keep a row's params (a JSON object); None for a row already answered."""
        if params is None:
            self._rows.append(None)
            return
        rest = dict(params)
        shared: list[tuple[str, bytes]] = []
        for key, value in params.items():
            if key == "messages" or not isinstance(value, str | list | dict):
                continue
            raw = orjson.dumps(value)
            if len(raw) >= SHARED_MIN_BYTES:
                kept = self._shared.get(raw)
                if kept is None:
                    kept = _exact(raw)
                    self._shared[kept] = kept
                shared.append((key, kept))
                rest[key] = None  # keeps the key's place, so the row reads back in its own key order
        self._rows.append((_exact(orjson.dumps(rest)), tuple(shared)))

    def params(self, index: int) -> dict[str, Any] | None:
        """The params of row `index` as they were sent; None once taken."""
        row = self._rows[index]
        if row is None:
            return None
        raw, shared = row
        params: dict[str, Any] = orjson.loads(raw)
        for key, value in shared:
            params[key] = orjson.loads(value)
        return params

    def take(self, index: int) -> dict[str, Any] | None:
        """The params of row `index`, forgotten here: an answered row no longer needs its prompt in memory."""
        params = self.params(index)
        self._rows[index] = None
        return params

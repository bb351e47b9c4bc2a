"""Batch rows from the create body to the moment they are answered, in little memory.

A million-row job sends batches of ~45k rows of ~5 KB each, almost all of it the same system prompt. The create
body is split into rows as it arrives when it has the usual layout, and each row waits as JSON bytes, with the
large values many rows repeat (system, tools) kept once per batch.
"""

from __future__ import annotations

import re
import tempfile
from typing import IO, Any

import orjson

from batch_engine.emulator.wire import ApiFailure, invalid

# Top-level values at least this long are shared between the rows of a batch that repeat them.
SHARED_MIN_BYTES = 256
_ROW_START = b'{"custom_id"'
_HEAD = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"requests"[ \t\n\r]*:[ \t\n\r]*\[[ \t\n\r]*')
_WHITESPACE = b" \t\n\r"  # JSON's whitespace (RFC 8259), narrower than regex \s
_HEAD_WAIT_BYTES = 256  # a head longer than this (much whitespace) is left to the whole-body parse
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_JSON_CONTAINERS = (str, list, dict)  # a tuple, not `str | list | dict`, which builds a union on every call


def check_item(index: int, item: Any, seen: set[str]) -> tuple[str, dict[str, Any]]:
    """The custom_id and params of item `index` of a create's `requests`, as the API checks them."""
    if not isinstance(item, dict) or set(item) != {"custom_id", "params"}:
        raise invalid(f"requests.{index}: each request needs exactly `custom_id` and `params`")
    custom_id, params = item["custom_id"], item["params"]
    if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
        raise invalid(f"requests.{index}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
    if custom_id in seen:
        raise invalid(f"requests.{index}.custom_id: {custom_id!r} is not unique within the batch")
    if not isinstance(params, dict):
        raise invalid(f"requests.{index}.params: Input should be an object")
    if "stream" in params:
        raise invalid(f"requests.{index}.params.stream: streaming is not supported in Message Batches")
    seen.add(custom_id)
    return custom_id, params


class StreamedRows:
    """A create body taken in chunk by chunk, its rows checked and packed as they complete, so neither the whole
    body nor its parse tree is ever in memory (three 225 MB creates may arrive at once).

    A row is cut before every `{"custom_id"`: outside a string that begins an object, and inside one it cannot
    occur (a quote there is escaped). A cut inside a row (a nested object whose first key is `custom_id`) leaves
    a piece that is not one JSON value, which gives up as below.

    The body also goes to an unnamed temporary file: when anything is not as expected (another layout, a bad
    row, invalid JSON), `whole` is set and the caller parses the whole body from there, as the API would.
    """

    def __init__(self) -> None:
        self.custom_ids: list[str] = []
        self.rows = PackedRows()
        self.whole = False
        self._seen: set[str] = set()
        self._buffer = bytearray()
        self._start = -1  # where the row being received begins in the buffer; -1 before the head
        self._scanned = 0
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="emulator_batch_body_")  # noqa: SIM115 (closed by whole_body)

    def feed(self, chunk: bytes) -> None:
        self._file.write(chunk)
        if self.whole:
            return
        self._buffer += chunk
        if self._start >= 0 or self._head(final=False):
            self._scan()

    def finish(self) -> None:
        """The body is complete: take the rows still in the buffer, the last one ending in `]}`."""
        if not self.whole and self._start < 0 and self._head(final=True):
            self._scan()
        if not self.whole:
            buffer, start = self._buffer, self._start
            self._take(buffer, start, _before(buffer, _before(buffer, len(buffer), start, b"}"), start, b"]"))
        self._buffer = bytearray()

    def _scan(self) -> None:
        """Take every row followed by the start of the next, then drop them from the buffer."""
        buffer, start = self._buffer, self._start
        while not self.whole:
            found = buffer.find(_ROW_START, max(self._scanned, start + 1))
            if found < 0:
                self._scanned = max(start + 1, len(buffer) - len(_ROW_START) + 1)
                break
            self._take(buffer, start, _before(buffer, found, start, b","))
            start = found
        if not self.whole:
            del buffer[:start]
            self._scanned -= start
            self._start = 0

    def whole_body(self) -> bytes:
        """The body as sent, read back from its file (which this closes)."""
        self._file.seek(0)
        body = self._file.read()
        self._file.close()
        return body

    def close(self) -> None:
        self._file.close()

    def _head(self, *, final: bool) -> bool:
        buffer = self._buffer
        if not final and len(buffer) < _HEAD_WAIT_BYTES:
            return False
        head = _HEAD.match(buffer)
        if head is None or not buffer.startswith(_ROW_START, head.end()):
            self._give_up()
            return False
        self._start = head.end()
        self._scanned = self._start + 1
        return True

    def _take(self, buffer: bytearray, start: int, end: int | None) -> None:
        if end is None:
            self._give_up()
            return
        try:
            item = orjson.loads(buffer[start:end])
            custom_id, params = check_item(len(self.custom_ids), item, self._seen)
        except (orjson.JSONDecodeError, ApiFailure):
            self._give_up()
            return
        self.custom_ids.append(custom_id)
        self.rows.append(params)

    def _give_up(self) -> None:
        self.whole = True
        self._buffer = bytearray()
        self.custom_ids, self.rows, self._seen = [], PackedRows(), set()


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
    """The params of a batch's rows as JSON bytes, large repeated values parsed and stored once; a row is freed when
    taken.

    The rows that repeat a value get the same parsed object: it is parsed once per batch, and what is derived from
    it (its token count, its cache key) is looked up by a string whose hash Python keeps. Readers never mutate
    params (the emulator only reads a request), so sharing is safe.
    """

    def __init__(self) -> None:
        self._rows: list[tuple[bytes, tuple[tuple[str, Any], ...]] | None] = []
        self._shared: dict[bytes, Any] = {}
        # Per param name, the last shared value (JSON, parsed): the next row's usually matches, found without
        # hashing its JSON.
        self._last: dict[str, tuple[bytes, Any]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, params: dict[str, Any] | None) -> None:
        """Keep a row's params (a JSON object); None for a row already answered."""
        if params is None:
            self._rows.append(None)
            return
        rest = dict(params)
        shared: list[tuple[str, Any]] = []
        for key, value in params.items():
            if key == "messages" or not isinstance(value, _JSON_CONTAINERS):
                continue
            raw = orjson.dumps(value)
            if len(raw) >= SHARED_MIN_BYTES:
                last = self._last.get(key)
                if last is not None and last[0] == raw:
                    kept = last[1]
                else:
                    kept = self._shared.get(raw)
                    if kept is None:
                        # Parsed from its JSON, not the caller's object: the row reads back as sent even if the
                        # caller changes its params later.
                        kept = self._shared[_exact(raw)] = orjson.loads(raw)
                    self._last[key] = (raw, kept)
                shared.append((key, kept))
                rest[key] = None  # keeps the key's place, so the row reads back in its own key order
        self._rows.append((_exact(orjson.dumps(rest)), tuple(shared)))

    def params(self, index: int) -> dict[str, Any] | None:
        """The params of row `index` as they were sent (the shared values are shared); None once taken."""
        row = self._rows[index]
        if row is None:
            return None
        raw, shared = row
        params: dict[str, Any] = orjson.loads(raw)
        for key, value in shared:
            params[key] = value
        return params

    def take(self, index: int) -> dict[str, Any] | None:
        """The params of row `index`, forgotten here: an answered row no longer needs its prompt in memory."""
        params = self.params(index)
        self._rows[index] = None
        return params

"""The only module that reads or writes files: JSON/JSONL via orjson, atomic writes."""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from batch_engine.crashpoints import crash_point
from batch_engine.errors import InputError


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    atomic_write_chunks(path, [data])


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record of a task file: its parsed JSON value, or why it could not be parsed."""

    index: int  # 0-based position in the file
    line: int | None  # 1-based line number for JSONL
    value: Any = None
    error: str | None = None


_BOM = b"\xef\xbb\xbf"


def iter_records(path: Path) -> Iterator[RawRecord]:
    """Read a JSON array or a JSONL file (auto-detected); JSONL is streamed line by line.

    Raises InputError when the file as a whole is unusable: unreadable, empty, or not JSON/JSONL at all.
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with handle:
        head = handle.read(4096)
        start = head[len(_BOM) :] if head.startswith(_BOM) else head
        if not start.strip():
            rest = handle.read()
            if not rest.strip():
                raise InputError(f"{path}: the file is empty")
            start = start + rest
        if start.lstrip().startswith(b"["):
            yield from _array_records(path, start + handle.read())
            return
        if start.lstrip().startswith(b"{"):
            while b"\n" not in head and (more := handle.read(1 << 16)):
                head += more
            if not _parses(head.split(b"\n", 1)[0]):
                # A pretty-printed object: no line of it parses alone, the whole file does.
                data = head + handle.read()
                value = _one_object(data)
                if value is not None:
                    yield RawRecord(index=0, line=None, value=value)
                    return
                yield from _jsonl_records(path, data, io.BytesIO())
                return
        yield from _jsonl_records(path, head, handle)


def _parses(data: bytes) -> bool:
    try:
        orjson.loads(data.removeprefix(_BOM))
    except orjson.JSONDecodeError:
        return False
    return True


def _one_object(data: bytes) -> dict[str, Any] | None:
    """The file as one JSON object (a single task written pretty-printed), or None when it is not one."""
    try:
        value = orjson.loads(data.removeprefix(_BOM))
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _array_records(path: Path, data: bytes) -> Iterator[RawRecord]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a JSON array of task objects")
    if not value:
        raise InputError(f"{path}: the JSON array is empty")
    for index, item in enumerate(value):
        yield RawRecord(index=index, line=None, value=item)


class _Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _lines(head: bytes, handle: _Reader) -> Iterator[bytes]:
    """The lines of `head` and then the rest of `handle`, without their newlines (the last one may be empty).

    Split a block at a time in C: cutting each line off the front of a 64 KiB buffer copied the rest of the
    buffer once per line (~32 KB per line, 32 GB of copying at a million lines).
    """
    pending = head
    while block := handle.read(1 << 20):
        *complete, pending = (pending + block).split(b"\n")
        yield from complete
    yield from pending.split(b"\n")


def _jsonl_records(path: Path, head: bytes, handle: IO[bytes]) -> Iterator[RawRecord]:
    count = 0
    parsed_any = False
    for record in _numbered(_lines(head, handle), index=0, lineno=1):
        count += 1
        parsed_any = parsed_any or record.error is None
        yield record
    if count == 0:
        raise InputError(f"{path}: the file is empty")
    if not parsed_any:
        raise InputError(f"{path}: not JSON or JSONL (no line parses as JSON)")


def _numbered(lines: Iterable[bytes], index: int, lineno: int) -> Iterator[RawRecord]:
    """JSONL lines as records: blank lines skipped, the first line's BOM dropped, numbered from `index` (records)
    and `lineno` (lines, 1-based)."""
    for raw in lines:
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if raw.strip():
            try:
                yield RawRecord(index=index, line=lineno, value=orjson.loads(raw))
            except orjson.JSONDecodeError as exc:
                yield RawRecord(index=index, line=lineno, error=f"not valid JSON ({exc.msg})")
            index += 1
        lineno += 1


@dataclass(frozen=True, slots=True)
class JsonlSplit:
    """A JSONL file cut in two at a line boundary: `iter_records` gives the records of the first part, then
    those of the second, which start at byte `offset`, record `index` and line `line` (1-based)."""

    offset: int
    index: int
    line: int


def split_jsonl(path: Path, min_bytes: int) -> JsonlSplit | None:
    """Where to cut a JSONL file of at least `min_bytes` in two halves, for two processes to read; None for a
    smaller file, or one `iter_records` does not read as JSONL (a JSON array, one pretty-printed object)."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < min_bytes:
                return None
            head = handle.read(1 << 16)
            first = head.removeprefix(_BOM).split(b"\n", 1)[0]
            if not first.lstrip().startswith(b"{") or not _parses(first):
                return None
            handle.seek(size // 2)
            cut = size // 2 + len(_line_rest(handle))
            if cut >= size:
                return None
            handle.seek(0)
            index = lines = 0
            for raw in _lines(b"", _Prefix(handle, cut - 1)):  # without the newline before the cut
                index += bool(raw.strip())
                lines += 1
    except OSError:
        return None  # `iter_records` says what is wrong with the file
    return JsonlSplit(offset=cut, index=index, line=lines + 1)


class _Prefix:
    """The first `size` bytes of a binary file, from its position, read as a file."""

    def __init__(self, handle: IO[bytes], size: int) -> None:
        self._handle = handle
        self._left = size

    def read(self, size: int) -> bytes:
        data = self._handle.read(min(size, self._left))
        self._left -= len(data)
        return data


def _line_rest(handle: IO[bytes]) -> bytes:
    """From the handle's position to the end of its line, the newline included."""
    rest = b""
    while block := handle.read(1 << 16):
        end = block.find(b"\n")
        if end >= 0:
            return rest + block[: end + 1]
        rest += block
    return rest


def iter_jsonl_part(path: Path, split: JsonlSplit, second: bool) -> Iterator[RawRecord]:
    """The records of one part of a split JSONL file (`split_jsonl`), numbered as `iter_records` numbers them."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with handle:
        if second:
            handle.seek(split.offset)
            yield from _numbered(_lines(b"", handle), split.index, split.line)
        else:
            # Without the newline before the cut.
            yield from _numbered(_lines(b"", _Prefix(handle, split.offset - 1)), index=0, lineno=1)


def count_records(path: Path) -> int:
    """How many records `iter_records` gives, raising as it does for an unusable file, without decoding every
    record: once a JSONL line has parsed, the rest are counted as lines (what the progress display needs up front;
    decoding a million records twice was ~10 s of a run's start-up)."""
    records = iter_records(path)
    count = 0
    for record in records:
        count += 1
        if record.line is not None and record.error is None:
            with path.open("rb") as handle:
                lines = _lines(b"", handle)
                skipped = sum(1 for _ in itertools.islice(lines, record.line))
                assert skipped == record.line
                return count + sum(1 for line in lines if line.strip())
    return count


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's bytes, read in blocks (the run key's input half)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """Stream `chunks` to a temporary file beside `path`, fsync, then rename over it (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_writers(path)
    # Named by host and pid, so a later writer can tell a dead writer's leftover from a live writer's file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 whatever the umask: give the output the mode any other new file would get.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                crash_point("output.partial")
            handle.flush()
            os.fsync(handle.fileno())
        crash_point("output.before_rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_HOST = socket.gethostname().replace(".", "_")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _sweep_dead_writers(path: Path) -> None:
    """Remove temporary files beside `path` that a writer killed mid-write left behind (its pid is gone on this
    host); a live writer's file, or another host's, is left alone."""
    prefix = f".{path.name}.{_HOST}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = stale.name[len(prefix) :].partition(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def iter_record_lines(path: Path) -> Iterator[bytes]:
    """Each record of a task file as one JSONL line (no newline), in file order, with the indexes `iter_records`
    gives: a JSON array's items re-encoded, a JSONL file's non-blank lines byte for byte (unparsable ones too, so
    a shard rejects them as the whole file would)."""
    data = read_bytes(path)
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    if data.lstrip().startswith(b"["):
        for record in _array_records(path, data):
            yield orjson.dumps(record.value)
        return
    if data.lstrip().startswith(b"{") and (value := _one_object(data)) is not None:
        yield orjson.dumps(value)
        return
    for raw in data.split(b"\n"):
        if raw.strip():
            yield raw

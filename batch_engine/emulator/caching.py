"""Prompt caching with the API's semantics: prefix hashes at breakpoints, TTLs, refresh on read, minimums.

The prefix up to each `cache_control` breakpoint (tools → system → messages) is one cache entry, keyed by the
model and a hash chain over the blocks. A request reads the longest live entry found at a breakpoint or up to
20 blocks before it, and writes an entry at every later breakpoint whose prefix reaches the model's minimum.
Planning is separate from committing so a request refused by the rate limiter leaves the cache untouched.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from batch_engine.emulator.params import Segment
from batch_engine.emulator.tokenizer import without_cache_control

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
LOOKBACK_BLOCKS = 20
_PRUNE_EVERY = 4096


# Built per request: read-only by `Final` fields, not `frozen=True` (see `Segment` in params.py).
@dataclass(slots=True)
class CachePlan:
    read_tokens: Final[int] = 0
    write_5m_tokens: Final[int] = 0
    write_1h_tokens: Final[int] = 0
    hit: Final[bytes | None] = None
    writes: Final[tuple[tuple[bytes, str], ...]] = ()

    @property
    def creation_tokens(self) -> int:
        return self.write_5m_tokens + self.write_1h_tokens


NO_CACHING = CachePlan()


def _canonical(block: Any) -> bytes:
    if isinstance(block, dict):
        return orjson.dumps(without_cache_control(block), option=orjson.OPT_SORT_KEYS)
    return orjson.dumps(block)


def prefix_keys(model: str, segments: Sequence[Segment], upto: int) -> list[bytes]:
    """Cache key of every prefix ending at positions 0..upto."""
    first = segments[0]
    link, first_key = _first_link(model, first.tag, _link_key(first.block))
    keys: list[bytes] = [first_key]
    if upto > 0:
        chain = link.copy()
        for segment in segments[1 : upto + 1]:
            chain.update(segment.tag)
            chain.update(b"\x00")
            chain.update(_canonical(segment.block))
            chain.update(b"\x00")
            keys.append(chain.copy().digest())
    return keys


_TEXT_BLOCK_KEYS = frozenset({"type", "text", "cache_control"})


def _link_key(block: Any) -> str | bytes:
    """What the first link is remembered by: a plain text block's text (a string whose hash Python keeps, so a
    prompt shared by a batch's rows is not hashed again per row), else the block's canonical JSON."""
    if isinstance(block, dict) and block.keys() <= _TEXT_BLOCK_KEYS and block.get("type") == "text":
        text = block.get("text")
        if isinstance(text, str):
            return text
    return _canonical(block)


# The first block is the one thousands of rows share (their system prompt or tools): its link of the chain is
# hashed once. Few entries, since the blocks can be large.
@functools.lru_cache(maxsize=16)
def _first_link(model: str, tag: bytes, key: str | bytes) -> tuple[Any, bytes]:
    # A text key stands for the canonical JSON of {"type": "text", "text": key} (keys sorted, as `_canonical` does).
    canonical = orjson.dumps({"text": key, "type": "text"}) if isinstance(key, str) else key
    chain = hashlib.blake2b(model.encode(), digest_size=16)
    for part in (tag, b"\x00", canonical, b"\x00"):
        chain.update(part)
    return chain, chain.digest()


class PromptCache:
    """Live cache entries: key → (expires_at on the emulator clock, ttl)."""

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[float, str]] = {}
        self._writes_since_prune = 0
        self.hits = 0
        self.writes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def plan(
        self, model: str, segments: Sequence[Segment], min_tokens: int, now: float, *, may_hit: bool = True
    ) -> CachePlan:
        """What this prompt would read and write now, without changing anything (`may_hit` False: a miss)."""
        breakpoints = [index for index, segment in enumerate(segments) if segment.ttl is not None]
        if not breakpoints:
            return NO_CACHING
        keys = prefix_keys(model, segments, breakpoints[-1])
        prefix_tokens: list[int] = []
        running = 0
        for segment in segments[: breakpoints[-1] + 1]:
            running += segment.tokens
            prefix_tokens.append(running)
        hit = self._longest_hit(keys, breakpoints, now) if may_hit else -1
        read = prefix_tokens[hit] if hit >= 0 else 0
        written_upto = read
        write_5m = write_1h = 0
        writes: list[tuple[bytes, str]] = []
        for position in breakpoints:
            # Prefixes below the model's minimum are silently not cached: they stay ordinary input.
            if position <= hit or prefix_tokens[position] < min_tokens:
                continue
            ttl = segments[position].ttl or "5m"
            tokens = prefix_tokens[position] - written_upto
            written_upto = prefix_tokens[position]
            if ttl == "1h":
                write_1h += tokens
            else:
                write_5m += tokens
            writes.append((keys[position], ttl))
        return CachePlan(read, write_5m, write_1h, keys[hit] if hit >= 0 else None, tuple(writes))

    def _longest_hit(self, keys: list[bytes], breakpoints: list[int], now: float) -> int:
        # Scanning the last breakpoint's window first finds the longest live prefix: any later position in an
        # earlier window lies inside a window already scanned.
        for breakpoint in reversed(breakpoints):
            for position in range(breakpoint, max(-1, breakpoint - LOOKBACK_BLOCKS), -1):
                entry = self._entries.get(keys[position])
                if entry is not None and entry[0] > now:
                    return position
        return -1

    def commit(self, plan: CachePlan, now: float) -> None:
        """Apply a plan: a hit refreshes its entry's lifetime at no charge; writes create entries."""
        if plan.hit is not None:
            entry = self._entries.get(plan.hit)
            if entry is not None:
                self._entries[plan.hit] = (now + TTL_SECONDS[entry[1]], entry[1])
            self.hits += 1
        for key, ttl in plan.writes:
            self._entries[key] = (now + TTL_SECONDS[ttl], ttl)
            self.writes += 1
        self._writes_since_prune += len(plan.writes)
        if self._writes_since_prune >= _PRUNE_EVERY:
            self._writes_since_prune = 0
            self._entries = {key: entry for key, entry in self._entries.items() if entry[0] > now}

    def snapshot(self) -> list[list[Any]]:
        return [[key.hex(), expires_at, ttl] for key, (expires_at, ttl) in self._entries.items()]

    def restore(self, rows: list[list[Any]]) -> None:
        self._entries = {bytes.fromhex(key): (float(expires_at), str(ttl)) for key, expires_at, ttl in rows}

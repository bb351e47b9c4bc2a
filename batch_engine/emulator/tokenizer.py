"""The emulator's own tokenizer, per model family, used for usage, count_tokens, caching and rate limits alike.

It is deliberately not the engine's offline estimate (ceil(bytes / 4)): if the emulator counted with the engine's
rule, every estimate would be exact in tests and `plan --count-tokens` could never show an error.

Text splits into pieces like a byte-pair tokenizer's: a word of up to 6 letters with its leading space, up to 3
digits, one punctuation mark, or a run of whitespace. That is the "legacy" family (Claude 4.6 and older). The
"new" family (Claude 4.7 and later, all 5.x) counts 1.3x as many for the same text: "the same text counts as
approximately 30 percent more tokens than on Claude Haiku 4.5" (docs: /models/haiku-5-5/whats-new-haiku-5-5).
Tools and other structured blocks count by their JSON text; images and PDFs by fixed sizes.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from typing import Any

import orjson

# Fixed costs for binary content; the real API sizes images by pixels and PDFs by pages.
IMAGE_TOKENS = 1600
DOCUMENT_TOKENS = 3000
_PIECE = re.compile(r" ?[A-Za-z]{1,6}| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+")
# Family → tokens per ten legacy pieces.
_FAMILY_TENTHS = {"legacy": 10, "new": 13}


# Counts of long texts are remembered: a batch repeats the same few-KB system prompt on every row, and counting
# it again per row was most of the emulator's CPU. Bounded by characters held, so huge documents cannot pile up.
MEMO_MIN_CHARS = 256
MEMO_MAX_CHARS = 32_000_000


class _PieceCounts:
    """A least-recently-used map from long texts to their piece counts, bounded by the characters it holds."""

    def __init__(self, max_chars: int) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._chars = 0
        self._max_chars = max_chars

    def pieces(self, text: str) -> int:
        count = self._counts.get(text)
        if count is not None:
            self._counts.move_to_end(text)
            return count
        count = _count_pieces(text)
        if len(text) <= self._max_chars:
            self._counts[text] = count
            self._chars += len(text)
            while self._chars > self._max_chars:
                oldest, _ = self._counts.popitem(last=False)
                self._chars -= len(oldest)
        return count


# Below this many characters one regex pass is cheaper than the dozen string passes of `_count_ascii_pieces`.
CLASS_COUNT_MIN_CHARS = 64
# An ASCII character's class: letter "a", digit "0", space " ", other whitespace "\t" (what `\s` matches: str.isspace),
# anything else ".".
_CLASSES = str.maketrans(
    {
        chr(code): "a" if chr(code).isalpha() else "0" if chr(code).isdigit() else
        " " if code == 0x20 else "\t" if chr(code).isspace() else "."
        for code in range(0x80)
    }
)  # fmt: skip
_NOT_SPACE = str.maketrans(dict.fromkeys("Aa0D.", "x"))


def _count_ascii_pieces(text: str) -> int:
    """The matches of `_PIECE` in an ASCII text, counted with whole-string methods instead of a match per piece.

    The pattern takes a run of L letters in ceil(L / 6) pieces, of L digits in ceil(L / 3), and any other
    non-whitespace character alone; a lone space before non-whitespace joins the piece after it, and any other
    run of whitespace is one piece.
    """
    classes = text.translate(_CLASSES)
    # One character per non-whitespace piece: "A" six letters, "D" three digits, "a" / "0" the rest of a run.
    pieces = (
        classes.replace("aaaaaa", "A").replace("aaaaa", "a").replace("aaaa", "a").replace("aaa", "a")
        .replace("aa", "a").replace("000", "D").replace("00", "0")
    )  # fmt: skip
    spaces = pieces.count(" ") + pieces.count("\t")
    if not spaces:
        return len(pieces)
    runs = pieces.translate(_NOT_SPACE)  # "x" for a non-whitespace piece
    space_runs = runs.count("x ") + runs.count("x\t") + (runs[0] != "x")
    lone = runs.count(" x") - runs.count("  x") - runs.count("\t x")
    return len(pieces) - spaces + space_runs - lone


def _count_pieces(text: str) -> int:
    if text.isascii():
        return _count_ascii_pieces(text) if len(text) >= CLASS_COUNT_MIN_CHARS else _PIECE.subn("", text)[1]
    # subn counts the matches without building a string per piece, as findall would: half the time. Non-ASCII
    # characters the pattern saw as punctuation: each multi-byte character costs one more token.
    return _PIECE.subn("", text)[1] + sum(1 for char in text if ord(char) > 0x7F)


_MEMO = _PieceCounts(MEMO_MAX_CHARS)


def text_tokens(text: str, family: str) -> int:
    """Tokens of a text for a model family ("legacy" or "new"); deterministic."""
    if not text:
        return 0
    pieces = _MEMO.pieces(text) if len(text) >= MEMO_MIN_CHARS else _count_pieces(text)
    return (pieces * _FAMILY_TENTHS[family] + 9) // 10


def prefix_within(text: str, tokens: int, family: str) -> str:
    """The longest prefix of `text`, cut between tokens, that counts at most `tokens`."""
    if text.isascii():
        # ceil(pieces * tenths / 10) <= tokens  <=>  pieces <= tokens * 10 // tenths. Every character is in some
        # piece and pieces follow one another, so the first `keep` pieces' lengths add up to where to cut.
        keep = max(0, tokens * 10 // _FAMILY_TENTHS[family])
        if _count_pieces(text) <= keep:
            return text
        # With more than `keep` pieces ahead, `keep` repetitions of the piece pattern never backtrack: they end
        # where the first `keep` pieces of a scan do.
        found = _first_pieces(keep).match(text)
        assert found is not None
        return text[: found.end()]
    if text_tokens(text, family) <= tokens:
        return text
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if text_tokens(text[:middle], family) <= tokens:
            low = middle
        else:
            high = middle - 1
    return text[:low]


@functools.lru_cache(maxsize=64)
def _first_pieces(count: int) -> re.Pattern[str]:
    return re.compile(f"(?:{_PIECE.pattern}){{{count}}}")


def prefix_keeping_head(head: str, tail: str, tokens: int, family: str) -> tuple[str, int]:
    """`prefix_within(head + tail, max(tokens, text_tokens(head)), family).rstrip()` and its tokens: the longest
    prefix within `tokens` that keeps `head` whole. The cut of `tail` is remembered.

    A reply is a one-off head (its echo) and a tail of filler that many replies share. When `head` ends in
    non-whitespace and `tail` starts with a space, no piece spans the join (a piece holds a space only at its
    start or in a run of whitespace), so the head's pieces are counted and the tail is cut on its own.
    """
    if not (head and not head[-1].isspace() and tail.startswith(" ") and head.isascii() and tail.isascii()):
        text = prefix_within(head + tail, max(tokens, text_tokens(head, family)), family).rstrip()
        return text, text_tokens(text, family)
    tenths = _FAMILY_TENTHS[family]
    head_pieces = _count_pieces(head)
    # Within max(tokens, text_tokens(head)) means at most max(tokens * 10 // tenths, head_pieces) pieces: the
    # head's own token count, ceil(head_pieces * tenths / 10), allows exactly head_pieces.
    cut, cut_pieces = _tail_cut(tail, max(0, tokens * 10 // tenths - head_pieces))
    return head + cut, ((head_pieces + cut_pieces) * tenths + 9) // 10


# Bounded: replies draw their tails from one filler text, at a few dozen offsets and lengths.
@functools.lru_cache(maxsize=8192)
def _tail_cut(tail: str, keep: int) -> tuple[str, int]:
    """The first `keep` pieces of an ASCII `tail` (all of it when it has fewer), without trailing whitespace, and
    their pieces."""
    cut = tail if _count_pieces(tail) <= keep else tail[: _first_pieces(keep).match(tail).end()]  # type: ignore[union-attr]
    cut = cut.rstrip()
    return cut, _count_pieces(cut)


def json_tokens(value: Any, family: str) -> int:
    return text_tokens(orjson.dumps(value).decode(), family)


def without_cache_control(block: dict[str, Any]) -> dict[str, Any]:
    if "cache_control" not in block:
        return block
    return {key: value for key, value in block.items() if key != "cache_control"}


def block_tokens(block: Any, family: str) -> int:
    """Tokens of one content block, tool definition or string."""
    if isinstance(block, str):
        return text_tokens(block, family)
    if not isinstance(block, dict):
        return json_tokens(block, family)
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return text_tokens(block["text"], family)
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        return text_tokens(block["thinking"], family)
    if kind == "redacted_thinking" and isinstance(block.get("data"), str):
        return text_tokens(block["data"], family)
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
            return text_tokens(source["data"], family)
        return DOCUMENT_TOKENS
    if kind == "tool_use":
        return text_tokens(str(block.get("name", "")), family) + json_tokens(block.get("input", {}), family)
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return sum(block_tokens(item, family) for item in content)
        return block_tokens(content, family)
    return json_tokens(without_cache_control(block), family)

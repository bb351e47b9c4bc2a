"""What the emulator does to save CPU (reply cuts and cache links remembered, shared params parsed once, pieces
counted without a regex match each) answers exactly as the computation it replaces: same text, counts and keys."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from batch_engine.emulator.caching import prefix_keys
from batch_engine.emulator.params import Segment
from batch_engine.emulator.replies import _filler
from batch_engine.emulator.rows import PackedRows
from batch_engine.emulator.structured import Generator
from batch_engine.emulator.tokenizer import (
    _PIECE,
    _count_ascii_pieces,
    _count_pieces,
    prefix_keeping_head,
    prefix_within,
    text_tokens,
)

# Letters, digits, punctuation, several kinds of whitespace and non-ASCII: every branch of the piece pattern.
_CHARS = st.sampled_from("abcdefgXYZ0123456789 .:_-\t\n\u00a0é漢")
_FAMILIES = st.sampled_from(["legacy", "new"])


def _uncached(head: str, tail: str, tokens: int, family: str) -> tuple[str, int]:
    text = prefix_within(head + tail, max(tokens, text_tokens(head, family)), family).rstrip()
    return text, text_tokens(text, family)


@given(
    st.text(_CHARS, max_size=40),
    st.text(_CHARS, max_size=120)
    | st.builds(lambda n, seed: " " + _filler(n, seed), st.integers(0, 400), st.integers(0, 10**6)),
    st.integers(0, 120),
    _FAMILIES,
)
def test_a_reply_cut_keeping_its_head_is_the_plain_cut(head: str, tail: str, tokens: int, family: str) -> None:
    expected = _uncached(head, tail, tokens, family)
    assert prefix_keeping_head(head, tail, tokens, family) == expected
    assert prefix_keeping_head(head, tail, tokens, family) == expected  # again, from the memo


@given(st.integers(0, 10**9), st.text(st.sampled_from("abc0123-_"), min_size=1, max_size=64), st.integers(1, 80))
def test_a_reply_cut_of_an_echo_and_filler_is_the_plain_cut(seed: int, custom_id: str, target: int) -> None:
    # The shape every text reply has: the memo is shared by replies whose echoes differ.
    echo = f"echo:{seed:012x} custom_id:{custom_id}"
    tail = " " + _filler(max(0, target * 8 - len(echo) - 1), seed)
    for family in ("legacy", "new"):
        assert prefix_keeping_head(echo, tail, target, family) == _uncached(echo, tail, target, family)


def _uncached_keys(model: str, segments: list[Segment], upto: int) -> list[bytes]:
    chain = hashlib.blake2b(model.encode(), digest_size=16)
    keys = []
    for segment in segments[: upto + 1]:
        block = segment.block
        plain = (
            {key: value for key, value in block.items() if key != "cache_control"} if isinstance(block, dict) else block
        )
        canonical = orjson.dumps(plain, option=orjson.OPT_SORT_KEYS) if isinstance(block, dict) else orjson.dumps(block)
        for part in (segment.tag, b"\x00", canonical, b"\x00"):
            chain.update(part)
        keys.append(chain.copy().digest())
    return keys


_TEXTS = st.text(_CHARS, min_size=1, max_size=30)
_BLOCKS = st.one_of(
    st.builds(lambda text: {"type": "text", "text": text}, _TEXTS),
    st.builds(lambda text: {"text": text, "type": "text", "cache_control": {"type": "ephemeral"}}, _TEXTS),
    st.builds(lambda text: {"type": "text", "text": text, "citations": [{"n": 1}]}, _TEXTS),
    st.builds(lambda text: {"type": "text", "text": [text]}, _TEXTS),
    st.builds(lambda text: {"type": "document", "source": {"type": "text", "data": text}}, _TEXTS),
    st.builds(lambda name: {"name": name, "input_schema": {"type": "object"}}, _TEXTS),
)


@given(
    st.sampled_from(["claude-haiku-5-5", "claude-sonnet-5-5"]),
    st.lists(st.tuples(st.sampled_from([b"tool", b"system", b"user"]), _BLOCKS), min_size=1, max_size=5),
    st.data(),
)
def test_cache_keys_are_the_hash_chain_over_canonical_blocks(
    model: str, blocks: list[tuple[bytes, Any]], data: st.DataObject
) -> None:
    segments = [Segment(tag, block, 1, "5m") for tag, block in blocks]
    upto = data.draw(st.integers(0, len(segments) - 1))
    expected = _uncached_keys(model, segments, upto)
    assert prefix_keys(model, segments, upto) == expected
    assert prefix_keys(model, segments, upto) == expected  # again, from the memo of the first link


def test_rows_share_one_parsed_copy_of_a_repeated_value_and_read_back_as_sent() -> None:
    system = [{"type": "text", "text": "Shared instructions. " * 40, "cache_control": {"type": "ephemeral"}}]
    sent = [{"model": "m", "max_tokens": 8, "system": system, "messages": [{"role": "user", "content": "q0"}]}]
    sent += [{**sent[0], "messages": [{"role": "user", "content": "q1"}]}]
    rows = PackedRows()
    for params in sent:
        rows.append(params)
    system[0]["text"] = "changed by the caller after the create"
    first, second = rows.params(0), rows.params(1)
    assert first is not None and second is not None
    assert first["system"] is second["system"]  # parsed once for the batch
    assert first["system"][0]["text"] == "Shared instructions. " * 40
    assert [first, second] == orjson.loads(orjson.dumps([rows.params(0), rows.params(1)]))
    assert list(first) == ["model", "max_tokens", "system", "messages"]


def test_rows_alternating_between_shared_values_read_back_as_sent() -> None:
    systems = [[{"type": "text", "text": f"Prompt {name}. " * 40}] for name in "ABA"]
    tools = [[{"name": "t", "input_schema": {"type": "object"}, "description": "x" * n}] for n in (300, 300, 400)]
    sent = [
        {"model": "m", "system": system, "tools": tool, "messages": [{"role": "user", "content": "q"}]}
        for system, tool in zip(systems * 2, tools + tools[::-1], strict=True)
    ]
    rows = PackedRows()
    for params in sent:
        rows.append(params)
    assert [rows.params(index) for index in range(len(sent))] == sent


def test_a_broken_json_answer_leaves_the_schema_it_came_from_as_sent() -> None:
    # Batch rows share their parsed output schema: generating an answer must not change it for the next row.
    schema = {"type": "object", "const": {"a": 1, "b": 2}, "required": ["a"]}
    assert Generator(schema, "echo", 0).broken(schema) == {"b": 2}
    assert schema == {"type": "object", "const": {"a": 1, "b": 2}, "required": ["a"]}


_ASCII = st.characters(max_codepoint=0x7F)
_RUNS = st.sampled_from(["a", "abcdefg", "0", "12345", " ", "  ", "\t", "\n ", " \x1c", "\x0b", ".", "-:", "aA1 "])


@given(st.text(_ASCII, max_size=300) | st.lists(_RUNS, max_size=80).map("".join))
def test_ascii_pieces_counted_by_classes_are_the_regex_matches(text: str) -> None:
    assert _count_ascii_pieces(text) == _PIECE.subn("", text)[1]
    assert _count_pieces(text) == _PIECE.subn("", text)[1]

"""What the emulator remembers to save CPU (reply cuts, per-prompt facts, parsed shared params) answers exactly as
the computation it replaces: same text, same counts, same keys."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batch_engine.emulator.replies import _filler
from batch_engine.emulator.tokenizer import prefix_keeping_head, prefix_within, text_tokens

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

"""Cost math against figures computed by hand from the price table."""

from __future__ import annotations

import pytest

from batch_engine.config import load_config
from batch_engine.models import Usage
from batch_engine.planning.pricing import baseline_cost, cost

CONFIG = load_config()
SONNET = CONFIG.models["claude-sonnet-5-5"]  # $2 in, $10 out, $2.50 5m write, $4 1h write, $0.10 read
HAIKU = CONFIG.models["claude-haiku-5-5"]


def test_realtime_plain_usage() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000)
    assert cost(usage, SONNET, "realtime") == pytest.approx(2.00 + 1.00)


def test_batch_halves_every_token_class() -> None:
    usage = Usage(
        input_tokens=1_000_000,
        output_tokens=100_000,
        cache_read_input_tokens=2_000_000,
        cache_creation_input_tokens=1_000_000,
        cache_write_1h_tokens=1_000_000,
    )
    # 2.00 + 1.00 + 0.20 read + 4.00 1h write = 7.20, halved
    assert cost(usage, SONNET, "batch") == pytest.approx(3.60)


def test_5m_and_1h_writes_are_priced_apart() -> None:
    usage = Usage(cache_creation_input_tokens=300_000, cache_write_5m_tokens=100_000, cache_write_1h_tokens=200_000)
    assert cost(usage, SONNET, "realtime") == pytest.approx(0.25 + 0.80)


def test_unsplit_cache_write_is_billed_at_the_5m_default() -> None:
    usage = Usage(cache_creation_input_tokens=1_000_000)
    assert cost(usage, SONNET, "realtime") == pytest.approx(2.50)


def test_thinking_tokens_are_already_in_output_tokens() -> None:
    usage = Usage(input_tokens=0, output_tokens=10_000, thinking_tokens=8_000)
    assert cost(usage, SONNET, "realtime") == pytest.approx(0.10)


def test_haiku_uses_the_long_prompt_card_above_100k_prompt_tokens() -> None:
    short = Usage(input_tokens=100_000, output_tokens=1_000)
    long = Usage(input_tokens=60_000, cache_read_input_tokens=40_001, output_tokens=1_000)
    assert cost(short, HAIKU, "realtime") == pytest.approx(100_000 * 0.10e-6 + 1_000 * 0.50e-6)
    assert cost(long, HAIKU, "realtime") == pytest.approx(60_000 * 0.50e-6 + 40_001 * 0.05e-6 + 1_000 * 2.50e-6)
    assert cost(long, HAIKU, "batch") == pytest.approx(cost(long, HAIKU, "realtime") / 2)


def test_baseline_is_all_prompt_tokens_at_input_price_realtime() -> None:
    usage = Usage(
        input_tokens=100,
        cache_read_input_tokens=900_000,
        cache_creation_input_tokens=99_900,
        output_tokens=1000,
    )
    assert baseline_cost(usage, SONNET) == pytest.approx(1_000_000 * 2e-6 + 1000 * 10e-6)


def test_per_frame_computes_once_per_frame_object() -> None:
    """The budget estimates every task of a run before it sends (`frame_prefix`), and the usage log describes every
    billed row: each frame's prompt is looked at once, and each frame object gets its own answer."""
    from batch_engine.planning import params

    seen: list[object] = []

    def length(frame: dict[str, object]) -> int:
        seen.append(frame)
        return len(str(frame["system"]))

    measured = params.per_frame(length)
    first, second, alike = {"system": "x" * 4000}, {"system": "y" * 100}, {"system": "y" * 100}
    for _ in range(3):
        assert [measured(first), measured(second), measured(alike)] == [4000, 100, 100]
    assert seen == [first, second, alike] and seen[2] is alike
    cached = {"model": "m", "system": [{"type": "text", "text": "z" * 4000, "cache_control": {"type": "ephemeral"}}]}
    assert params.frame_prefix(cached) == params.system_prefix(cached)

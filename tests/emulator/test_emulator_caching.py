"""Prompt caching in the emulator: writes, reads, minimums, TTLs on the scaled clock, ITPM, batches."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from batch_engine.config import load_config
from batch_engine.emulator import RunningEmulator, text_tokens


def tokens(text: str) -> int:
    """The emulator's count for a 5.x model (the new tokenizer family)."""
    return text_tokens(text, "new")


HAIKU = "claude-haiku-5-5"  # minimum cacheable prefix: 512 tokens
LEGACY = "claude-haiku-4-5"  # minimum cacheable prefix: 4096 tokens
LONG_SYSTEM = "You are a careful reviewer of platform incidents. " * 60  # 750 tokens
SYSTEM_TOKENS = tokens(LONG_SYSTEM)


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


def _system(text: str = LONG_SYSTEM, ttl: str = "5m") -> list[Any]:
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral", "ttl": ttl}}]


def _ask(client: anthropic.Anthropic, question: str = "What failed?", **params: Any) -> Any:
    # Thinking off: these tests count input and cache tokens, not the thinking Haiku 5.5 does by default.
    request: dict[str, Any] = {"model": HAIKU, "max_tokens": 50, "system": _system(), "thinking": {"type": "disabled"}}
    request |= params
    return client.messages.create(messages=[{"role": "user", "content": question}], **request).usage


def test_same_long_system_prompt_writes_then_reads(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    first = _ask(client)
    assert first.cache_creation_input_tokens == SYSTEM_TOKENS and first.cache_read_input_tokens == 0
    assert first.cache_creation.ephemeral_5m_input_tokens == SYSTEM_TOKENS
    assert first.cache_creation.ephemeral_1h_input_tokens == 0
    # input_tokens counts only what follows the last breakpoint.
    assert first.input_tokens == tokens("What failed?")

    second = _ask(client, "Why did it fail?")
    assert second.cache_read_input_tokens == SYSTEM_TOKENS and second.cache_creation_input_tokens == 0
    assert second.input_tokens == tokens("Why did it fail?")
    assert emulator.stats()["tokens_billed"] | {"output": 0} == {
        "input": first.input_tokens + second.input_tokens,
        "output": 0,
        "cache_read": SYSTEM_TOKENS,
        "cache_write": SYSTEM_TOKENS,
        "cache_write_5m": SYSTEM_TOKENS,
        "cache_write_1h": 0,
        "thinking": 0,
    }


def test_prefix_below_the_model_minimum_is_silently_not_cached(client: anthropic.Anthropic) -> None:
    for _ in range(2):
        usage = _ask(client, model=LEGACY)  # 750 tokens < 4096
        assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0
        # Haiku 4.5 counts with the older tokenizer: the same text is fewer tokens than on 5.x.
        legacy = text_tokens(LONG_SYSTEM, "legacy") + text_tokens("What failed?", "legacy")
        assert usage.input_tokens == legacy < SYSTEM_TOKENS + tokens("What failed?")


def test_five_minute_entry_expires_on_the_emulator_clock_and_reads_refresh_it(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    assert _ask(client).cache_creation_input_tokens == SYSTEM_TOKENS
    emulator.advance_clock(290)
    assert _ask(client).cache_read_input_tokens == SYSTEM_TOKENS
    emulator.advance_clock(290)  # 580 s after the write, but only 290 s after the refreshing read
    assert _ask(client).cache_read_input_tokens == SYSTEM_TOKENS
    emulator.advance_clock(301)
    expired = _ask(client)
    assert expired.cache_read_input_tokens == 0 and expired.cache_creation_input_tokens == SYSTEM_TOKENS


def test_one_hour_entry_outlives_five_minutes(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    written = _ask(client, system=_system(ttl="1h"))
    assert written.cache_creation.ephemeral_1h_input_tokens == SYSTEM_TOKENS
    emulator.advance_clock(1800)
    assert _ask(client, system=_system(ttl="1h")).cache_read_input_tokens == SYSTEM_TOKENS
    emulator.advance_clock(3601)
    assert _ask(client, system=_system(ttl="1h")).cache_creation_input_tokens == SYSTEM_TOKENS


def test_time_scale_makes_the_ttl_pass_in_wall_time(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(time_scale=3000)  # 5 minutes in 0.1 s
    assert _ask(client).cache_creation_input_tokens == SYSTEM_TOKENS
    time.sleep(0.15)
    assert _ask(client).cache_creation_input_tokens == SYSTEM_TOKENS


def test_tools_then_system_breakpoints_split_writes_by_ttl(client: anthropic.Anthropic) -> None:
    tools: list[Any] = [
        {
            "name": f"tool_{index}",
            "description": "Looks things up in the incident database. " * 10,
            "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
        }
        for index in range(5)
    ]
    tools[-1]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    tool_tokens = client.messages.count_tokens(model=HAIKU, tools=tools, messages=[{"role": "user", "content": "x"}])
    tools_only = tool_tokens.input_tokens - tokens("x")

    first = _ask(client, tools=tools)
    assert first.cache_creation.ephemeral_1h_input_tokens == tools_only
    assert first.cache_creation.ephemeral_5m_input_tokens == SYSTEM_TOKENS
    # Same tools, different system: the tools prefix is read, the new system prefix written.
    other_system = "Another long system prompt for a different team. " * 60
    second = _ask(client, tools=tools, system=_system(other_system))
    assert second.cache_read_input_tokens == tools_only
    assert second.cache_creation_input_tokens == tokens(other_system)


def test_growing_conversation_reads_the_earlier_prefix_through_lookback(client: anthropic.Anthropic) -> None:
    def turn(text: str, cached: bool) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "text", "text": text}
        if cached:
            block["cache_control"] = {"type": "ephemeral"}
        return {"role": "user", "content": [block]}

    question = "Here is the incident log: " + "line of log output. " * 150
    first = client.messages.create(model=HAIKU, max_tokens=20, messages=[turn(question, True)]).usage
    assert first.cache_creation_input_tokens == tokens(question) and first.input_tokens == 0

    follow_up = [turn(question, False), {"role": "assistant", "content": "Noted."}, turn("And the root cause?", True)]
    second = client.messages.create(model=HAIKU, max_tokens=20, messages=follow_up).usage
    assert second.cache_read_input_tokens == tokens(question)
    assert second.cache_creation_input_tokens == tokens("Noted.") + tokens("And the root cause?")
    assert second.input_tokens == 0


def test_automatic_caching_puts_the_breakpoint_on_the_last_block(client: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {
        "model": HAIKU,
        "max_tokens": 20,
        "system": LONG_SYSTEM,
        "cache_control": {"type": "ephemeral"},
        "messages": [{"role": "user", "content": "Summarize."}],
    }
    total = SYSTEM_TOKENS + tokens("Summarize.")
    assert client.messages.create(**request).usage.cache_creation_input_tokens == total
    again = client.messages.create(**request).usage
    assert again.cache_read_input_tokens == total and again.input_tokens == 0


def test_entries_belong_to_one_model(client: anthropic.Anthropic) -> None:
    assert _ask(client).cache_creation_input_tokens == SYSTEM_TOKENS
    other = _ask(client, model="claude-sonnet-5-5", thinking={"type": "between_tools"})
    assert other.cache_creation_input_tokens == SYSTEM_TOKENS


def test_count_tokens_ignores_caching(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "What failed?"}]
    _ask(client)
    counted = client.messages.count_tokens(model=HAIKU, system=_system(), messages=messages)
    assert counted.input_tokens == SYSTEM_TOKENS + tokens("What failed?")


def test_cache_reads_do_not_count_toward_itpm(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(itpm=SYSTEM_TOKENS + 100)
    _ask(client)  # writes: the whole prompt counts toward ITPM
    for _ in range(5):
        assert _ask(client).cache_read_input_tokens == SYSTEM_TOKENS

    uncached = {"model": HAIKU, "max_tokens": 20, "system": LONG_SYSTEM}
    emulator.configure(itpm=SYSTEM_TOKENS + 101)  # new limits start with full buckets
    client.messages.create(messages=[{"role": "user", "content": "one"}], **uncached)
    with pytest.raises(anthropic.RateLimitError, match="input tokens per minute"):
        client.messages.create(messages=[{"role": "user", "content": "two"}], **uncached)


def test_batch_rows_share_the_cache(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    rows = [
        {
            "custom_id": f"row-{index}",
            "params": {
                "model": HAIKU,
                "max_tokens": 20,
                "system": _system(ttl="1h"),
                "messages": [{"role": "user", "content": f"ticket {index}"}],
            },
        }
        for index in range(10)
    ]
    emulator.configure(batch_cache_hit_rate=1.0)  # the best case; hits are best-effort (default 0.6)
    batch = client.messages.batches.create(requests=rows)
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        time.sleep(0.02)
    usages = [row.result.message.usage for row in client.messages.batches.results(batch.id)]
    assert sorted(usage.cache_creation_input_tokens for usage in usages) == [0] * 9 + [SYSTEM_TOKENS]
    assert sorted(usage.cache_read_input_tokens for usage in usages) == [0] + [SYSTEM_TOKENS] * 9
    assert all(usage.service_tier == "batch" for usage in usages)
    # Batch prices are half of standard, cache writes and reads included.
    price = load_config().models[HAIKU].price
    standard = sum(
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + usage.cache_creation.ephemeral_1h_input_tokens * price.cache_write_1h
        + usage.cache_read_input_tokens * price.cache_read
        for usage in usages
    )
    assert emulator.stats()["cost_usd"]["batch"] == pytest.approx(standard / 1_000_000 * 0.5)


def test_emulator_bills_cache_tokens_at_their_own_prices(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    price = load_config().models[HAIKU].price
    written, read = _ask(client), _ask(client)
    expected = (
        (written.input_tokens + read.input_tokens) * price.input
        + (written.output_tokens + read.output_tokens) * price.output
        + SYSTEM_TOKENS * price.cache_write_5m
        + SYSTEM_TOKENS * price.cache_read
    ) / 1_000_000
    cost = emulator.stats()["cost_usd"]
    assert cost["realtime"] == pytest.approx(expected) and cost["batch"] == 0


def test_batch_cache_hits_are_best_effort(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(batch_cache_hit_rate=0.5)
    _ask(client, system=_system(ttl="1h"))  # the entry is live before the batch starts
    params = {"model": HAIKU, "max_tokens": 20, "system": _system(ttl="1h"), "thinking": {"type": "disabled"}}
    rows = [
        {"custom_id": f"row-{i}", "params": params | {"messages": [{"role": "user", "content": f"ticket {i}"}]}}
        for i in range(60)
    ]
    batch = client.messages.batches.create(requests=rows)
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        time.sleep(0.02)
    usages = [row.result.message.usage for row in client.messages.batches.results(batch.id)]
    hits = sum(usage.cache_read_input_tokens == SYSTEM_TOKENS for usage in usages)
    assert 15 <= hits <= 45  # the rest wrote the entry again, billed as writes
    assert all(
        usage.cache_creation_input_tokens == SYSTEM_TOKENS for usage in usages if not usage.cache_read_input_tokens
    )

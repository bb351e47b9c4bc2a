"""The emulator's one tokenizer, used for usage, count_tokens, caching and rate limits alike.

Text counts as ceil(UTF-8 bytes / 4) per block (`batch_engine.planning.tokens.estimate_tokens`); tools and
other structured blocks count by their JSON size; images and PDFs by fixed sizes.
"""

from __future__ import annotations

from typing import Any

import orjson

# One rule for the engine's estimates and the emulator's billing, so planned and billed counts agree.
from batch_engine.planning.tokens import estimate_tokens

# Fixed costs for binary content; the real API sizes images by pixels and PDFs by pages.
IMAGE_TOKENS = 1600
DOCUMENT_TOKENS = 3000


def json_tokens(value: Any) -> int:
    return (len(orjson.dumps(value)) + 3) // 4


def without_cache_control(block: dict[str, Any]) -> dict[str, Any]:
    if "cache_control" not in block:
        return block
    return {key: value for key, value in block.items() if key != "cache_control"}


def block_tokens(block: Any) -> int:
    """Tokens of one content block, tool definition or string."""
    if isinstance(block, str):
        return estimate_tokens(block)
    if not isinstance(block, dict):
        return json_tokens(block)
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return estimate_tokens(block["text"])
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        return estimate_tokens(block["thinking"])
    if kind == "redacted_thinking" and isinstance(block.get("data"), str):
        return estimate_tokens(block["data"])
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
            return estimate_tokens(source["data"])
        return DOCUMENT_TOKENS
    if kind == "tool_use":
        return estimate_tokens(str(block.get("name", ""))) + json_tokens(block.get("input", {}))
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return sum(block_tokens(item) for item in content)
        return block_tokens(content)
    return json_tokens(without_cache_control(block))

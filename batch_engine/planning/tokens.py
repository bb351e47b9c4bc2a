"""The offline token estimate: one deterministic rule, shared with the emulator's tokenizer."""

from __future__ import annotations

from typing import Any


def estimate_tokens(text: str) -> int:
    """Approximate tokens as ceil(UTF-8 bytes / 4) — close to Claude 5's tokenizer on English prose."""
    return (len(text.encode("utf-8")) + 3) // 4


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(block.get("text", "")) for block in content if isinstance(block, dict) and "text" in block)
    return ""


def estimate_params_tokens(params: dict[str, Any]) -> int:
    """Estimated input tokens of a Messages request: system + every message's text."""
    total = estimate_tokens(_content_text(params.get("system", "")))
    for message in params.get("messages", []):
        if isinstance(message, dict):
            total += estimate_tokens(_content_text(message.get("content", "")))
    return total

"""The offline token estimate: one deterministic rule, scaled by the model's tokenizer family.

The emulator counts with a tokenizer of its own (emulator/tokenizer.py), so this estimate is measurably off
there, as it is against the real API; `plan --count-tokens` reports by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def estimate_tokens(text: str, factor: float = 1.0) -> int:
    """Approximate tokens as ceil(UTF-8 bytes / 4 * factor).

    bytes / 4 is close to the tokenizer of Claude 4.6 and older on English prose; Claude 4.7+ and all 5.x count
    about 30% more for the same text (factor 1.3, docs: /models/haiku-5-5/whats-new-haiku-5-5).
    """
    base = (len(text.encode("utf-8")) + 3) // 4
    return base if factor == 1.0 else math.ceil(base * factor)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(block.get("text", "")) for block in content if isinstance(block, dict) and "text" in block)
    return ""


def estimate_params_tokens(params: dict[str, Any], factor: float = 1.0) -> int:
    """Estimated input tokens of a Messages request: system + every message's text."""
    total = estimate_tokens(_content_text(params.get("system", "")), factor)
    for message in params.get("messages", []):
        if isinstance(message, dict):
            total += estimate_tokens(_content_text(message.get("content", "")), factor)
    return total


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Counted input tokens by input index (`messages.count_tokens`, batch_engine.token_count), how many distinct
    prompts were counted, and why any were not."""

    by_index: dict[int, int]
    distinct_prompts: int
    note: str | None = None

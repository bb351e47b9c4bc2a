"""What one answered request bills: the usage object the API returns, its cost, and the running totals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from batch_engine.emulator.caching import CachePlan
from batch_engine.emulator.catalog import ModelRules


# Built per request: read-only by `Final` fields, not `frozen=True` (see `Segment` in params.py).
@dataclass(slots=True)
class Billed:
    input_tokens: Final[int]
    output_tokens: Final[int]
    cache_read: Final[int]
    write_5m: Final[int]
    write_1h: Final[int]
    thinking_tokens: Final[int]

    @classmethod
    def of(cls, total_input: int, plan: CachePlan, output_tokens: int, thinking_tokens: int) -> Billed:
        # input_tokens counts only what no cache entry covers (after the last breakpoint, or below minimum).
        uncached = total_input - plan.read_tokens - plan.creation_tokens
        return cls(
            uncached,
            output_tokens,
            plan.read_tokens,
            plan.write_5m_tokens,
            plan.write_1h_tokens,
            thinking_tokens,
        )

    def usage_json(self, service_tier: str) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.write_5m + self.write_1h,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.write_5m,
                "ephemeral_1h_input_tokens": self.write_1h,
            },
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"thinking_tokens": self.thinking_tokens},
            "service_tier": service_tier,
        }

    def cost_usd(self, spec: ModelRules, discount: float) -> float:
        """Price at the model's rate card for this prompt size, times the batch discount (1.0 realtime)."""
        price = spec.rates_for_prompt(self.input_tokens + self.cache_read + self.write_5m + self.write_1h)
        dollars = (
            self.input_tokens * price.input
            + self.output_tokens * price.output
            + self.cache_read * price.cache_read
            + self.write_5m * price.cache_write_5m
            + self.write_1h * price.cache_write_1h
        ) / 1_000_000
        return dollars * discount


class BillingTotals:
    """Running token and dollar totals per lane ("realtime" for Messages, "batch" for batch rows)."""

    def __init__(self) -> None:
        self.tokens = {lane: dict.fromkeys(_TOKEN_KEYS, 0) for lane in ("realtime", "batch")}
        self.cost = {"realtime": 0.0, "batch": 0.0}

    def add(self, lane: str, billed: Billed, cost: float) -> None:
        tokens = self.tokens[lane]
        tokens["input"] += billed.input_tokens
        tokens["output"] += billed.output_tokens
        tokens["cache_read"] += billed.cache_read
        tokens["cache_write"] += billed.write_5m + billed.write_1h
        tokens["cache_write_5m"] += billed.write_5m
        tokens["cache_write_1h"] += billed.write_1h
        tokens["thinking"] += billed.thinking_tokens
        self.cost[lane] += cost

    def totals(self) -> dict[str, int]:
        return {key: self.tokens["realtime"][key] + self.tokens["batch"][key] for key in _TOKEN_KEYS}

    def snapshot(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "cost": self.cost}

    def restore(self, data: dict[str, Any]) -> None:
        self.tokens = {lane: {key: int(data["tokens"][lane][key]) for key in _TOKEN_KEYS} for lane in self.tokens}
        self.cost = {lane: float(data["cost"][lane]) for lane in self.cost}


_TOKEN_KEYS = ("input", "output", "cache_read", "cache_write", "cache_write_5m", "cache_write_1h", "thinking")

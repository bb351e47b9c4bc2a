"""Cost math: exact cost of a usage object, the all-realtime no-cache baseline, and pre-send estimates."""

from __future__ import annotations

from batch_engine.config import Config, ModelSpec, Route
from batch_engine.models import Usage

_PER_TOKEN = 1e-6  # prices are per million tokens


def cost(usage: Usage, spec: ModelSpec, route: Route, batch_discount: float = 0.5) -> float:
    """USD billed for `usage`: each token class at its price, times the batch discount on the batch route.

    Cache writes without a TTL breakdown are billed as 5-minute writes, which is the API's default TTL.
    """
    price = spec.price_for_prompt(usage.prompt_tokens)
    split_writes = usage.cache_write_5m_tokens + usage.cache_write_1h_tokens
    write_5m = usage.cache_write_5m_tokens if split_writes else usage.cache_creation_input_tokens
    dollars = (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + write_5m * price.cache_write_5m
        + usage.cache_write_1h_tokens * price.cache_write_1h
        + usage.cache_read_input_tokens * price.cache_read
    ) * _PER_TOKEN
    return dollars * (batch_discount if route == "batch" else 1.0)


def baseline_cost(usage: Usage, spec: ModelSpec) -> float:
    """What the same request would have cost realtime with no prompt caching."""
    price = spec.price_for_prompt(usage.prompt_tokens)
    return (usage.prompt_tokens * price.input + usage.output_tokens * price.output) * _PER_TOKEN


def estimate_cost(input_tokens: int, max_output_tokens: int, spec: ModelSpec, route: Route, config: Config) -> float:
    """Upper-bound estimate before sending: every output token up to max_tokens, no cache savings."""
    usage = Usage(input_tokens=input_tokens, output_tokens=max_output_tokens)
    return cost(usage, spec, route, config.batch_discount)

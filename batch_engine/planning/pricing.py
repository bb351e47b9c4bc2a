"""Cost math: exact cost of a usage object, the all-realtime no-cache baseline, and pre-send estimates."""

from __future__ import annotations

from batch_engine.config import Config, ModelSpec, Route
from batch_engine.models import Tokens, Usage

_PER_TOKEN = 1e-6  # prices are per million tokens


def cost(usage: Usage | Tokens, spec: ModelSpec, route: Route, batch_discount: float = 0.5) -> float:
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


def baseline_cost(usage: Usage | Tokens, spec: ModelSpec) -> float:
    """What the same request would have cost realtime with no prompt caching."""
    return baseline_tokens_cost(usage.prompt_tokens, usage.output_tokens, spec)


def baseline_tokens_cost(prompt_tokens: int, output_tokens: int, spec: ModelSpec) -> float:
    """`baseline_cost` of a request that saw `prompt_tokens` in all (uncached, read and written) and wrote
    `output_tokens`."""
    price = spec.price_for_prompt(prompt_tokens)
    return (prompt_tokens * price.input + output_tokens * price.output) * _PER_TOKEN


def estimate_cost(
    input_tokens: int,
    max_output_tokens: int,
    spec: ModelSpec,
    route: Route,
    config: Config,
    cache_write: tuple[int, str] | None = None,
) -> float:
    """Upper-bound estimate before sending: every output token up to max_tokens, no cache savings.

    `cache_write` (prefix tokens, TTL) prices the cacheable prefix as a cache write, every time: cache hits inside a
    batch are best-effort ("typically 30-98%", docs: batch-processing), so a prefix may be written again and again,
    and a write costs more than plain input (1.25x for 5 minutes, 2x for 1 hour).
    """
    written, ttl = cache_write if cache_write is not None else (0, "5m")
    written = min(written, input_tokens)
    # A plain `Tokens`, not a pydantic `Usage`: the estimate is made for every task of a run before it sends
    # (a million at a nightly job's scale), and validating a `Usage` each time was half of its CPU.
    usage = Tokens(
        input_tokens=input_tokens - written,
        output_tokens=max_output_tokens,
        cache_creation_input_tokens=written,
        cache_write_5m_tokens=written if ttl != "1h" else 0,
        cache_write_1h_tokens=written if ttl == "1h" else 0,
    )
    return cost(usage, spec, route, config.batch_discount)

"""A usage-log row for tests: every field of `UsageRecord` with a neutral default, the ones a test cares about
given."""

from __future__ import annotations

from typing import Any

from batch_engine.state.usage_log import UsageRecord

_DEFAULTS: dict[str, Any] = {
    "at": 0.0,
    "run_key": "r",
    "task_id": "t",
    "task_type": "summarize",
    "route": "batch",
    "model": "claude-haiku-5-5",
    "status": "succeeded",
    "input_tokens": 0,
    "output_tokens": 0,
    "cache_read_tokens": 0,
    "cache_write_5m_tokens": 0,
    "cache_write_1h_tokens": 0,
    "thinking_tokens": 0,
    "cost_usd": 0.0,
    "baseline_usd": 0.0,
    "latency_s": None,
    "max_tokens": 1024,
    "prefix_key": None,
    "prefix_tokens": 0,
    "cache_ttl": None,
    "thinking": None,
    "route_reason": "",
    "request_key": None,
}


def usage_row(**fields: Any) -> UsageRecord:
    """A `UsageRecord` of `fields`, the rest at their defaults above."""
    unknown = set(fields) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"not UsageRecord fields: {sorted(unknown)}")
    return UsageRecord(**(_DEFAULTS | fields))

"""Pure: prompt-cache statistics from the usage log — hit rate by tokens, what caching saved net of the write
premium, and where the hit rate is low, why."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from batch_engine.config import Config, ModelSpec
from batch_engine.state.usage_log import UsageRecord

GroupBy = Literal["task_type", "model", "route"]
LOW_HIT_RATE = 0.5
_PER_TOKEN = 1e-6


@dataclass
class CacheStats:
    """Cache figures of one group of requests."""

    group: str
    requests: int = 0
    uncached_input: int = 0
    cache_read: int = 0
    cache_write: int = 0
    saved_usd: float = 0.0
    diagnosis: list[str] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        """read / (read + write + uncached input), by tokens: a hit on a 10-token prompt is not a hit on 10k."""
        total = self.cache_read + self.cache_write + self.uncached_input
        return self.cache_read / total if total else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "requests": self.requests,
            "hit_rate": round(self.hit_rate, 4),
            "cache_read_tokens": self.cache_read,
            "cache_write_tokens": self.cache_write,
            "uncached_input_tokens": self.uncached_input,
            "saved_usd": round(self.saved_usd, 6),
            "diagnosis": self.diagnosis,
        }


def caching_saved(record: UsageRecord, spec: ModelSpec, batch_discount: float) -> float:
    """What the request's cached tokens saved against sending them uncached, net of the write premium."""
    price = spec.price_for_prompt(record.prompt_tokens)
    uncached = (record.cache_read_tokens + record.cache_write_tokens) * price.input
    actual = (
        record.cache_read_tokens * price.cache_read
        + record.cache_write_5m_tokens * price.cache_write_5m
        + record.cache_write_1h_tokens * price.cache_write_1h
    )
    saved = (uncached - actual) * _PER_TOKEN
    return saved * (batch_discount if record.route == "batch" else 1.0)


def _key(record: UsageRecord, by: GroupBy) -> str:
    return str(getattr(record, by))


def cache_stats(records: Iterable[UsageRecord], by: GroupBy, config: Config) -> list[CacheStats]:
    """One CacheStats per group, most spent-on first; low hit rates carry a diagnosis."""
    groups: dict[str, CacheStats] = {}
    members: dict[str, list[UsageRecord]] = {}
    for record in records:
        key = _key(record, by)
        stats = groups.setdefault(key, CacheStats(key))
        members.setdefault(key, []).append(record)
        stats.requests += 1
        stats.uncached_input += record.input_tokens
        stats.cache_read += record.cache_read_tokens
        stats.cache_write += record.cache_write_tokens
        spec = config.models.get(record.model)
        if spec is not None:
            stats.saved_usd += caching_saved(record, spec, config.batch_discount)
    for key, stats in groups.items():
        if stats.hit_rate < LOW_HIT_RATE:
            stats.diagnosis = diagnose(members[key], config)
    return sorted(groups.values(), key=lambda s: (-(s.cache_read + s.cache_write + s.uncached_input), s.group))


def diagnose(records: Sequence[UsageRecord], config: Config) -> list[str]:
    """Why a group's hit rate is low, each reason with the numbers behind it."""
    reasons: list[str] = []
    below: Counter[tuple[str, int, int]] = Counter()
    unmarked: Counter[str] = Counter()
    short_ttl_writes = 0
    repeats = Counter((r.run_key, r.prefix_key) for r in records if r.prefix_key)
    for record in records:
        spec = config.models.get(record.model)
        if record.prefix_key is None or spec is None:
            continue
        if record.cache_ttl is None:
            if record.prefix_tokens < spec.min_cacheable_tokens:
                below[(record.model, record.prefix_tokens, spec.min_cacheable_tokens)] += 1
            elif repeats[(record.run_key, record.prefix_key)] > 1:
                unmarked[record.model] += 1
        elif record.route == "batch" and record.cache_ttl == "5m" and record.cache_write_tokens:
            short_ttl_writes += 1
    for (model, tokens, minimum), count in sorted(below.items()):
        reasons.append(
            f"prefix below the model's minimum: {count} requests have a ~{tokens}-token system prompt, "
            f"under {model}'s {minimum}-token minimum, so the API caches nothing"
        )
    for model, count in sorted(unmarked.items()):
        reasons.append(
            f"breakpoints missing: {count} {model} requests repeat a cacheable system prompt with no "
            "cache_control (set cache_system = true for the task type)"
        )
    if short_ttl_writes:
        reasons.append(
            f"TTL too short for the batch path: {short_ttl_writes} batch requests wrote a 5-minute cache entry; "
            "batches outlast it, use the 1 h TTL"
        )
    if not reasons:
        writes = sum(1 for r in records if r.cache_write_tokens)
        reasons.append(
            f"few reuses: {writes} of {len(records)} requests wrote the cache instead of reading it "
            "(prefixes rarely repeat within the TTL)"
        )
    return reasons

"""Prefect global concurrency limits as the realtime lane's shared rate limits, so every worker and flow run
sending to the same API account stays under one requests-per-minute budget per model class.

Create each limit once, with a slot decay of RPM/60 so that taken slots come back at the account's rate:

    prefect gcl create anthropic-rpm --limit 4000 --slot-decay-per-second 66.67

and pass `global_rate_limit=anthropic-rpm` to the flow (every model takes slots from it), or a mapping from
model to limit, since Anthropic's limits are per model class:
`{"claude-sonnet-4-6": "anthropic-rpm-sonnet", "claude-haiku-4-5": "anthropic-rpm-haiku", "*": "anthropic-rpm"}`
(`"*"`: every model without an entry; without it such a model takes no shared slot). The lane's local buckets
still apply on top.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.concurrency.asyncio import rate_limit
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from batch_engine.errors import ConfigError
from batch_engine.lanes import SharedLimit

# One limit name for every model, or model → limit name (with "*" for every other model).
GlobalRateLimit = str | dict[str, str]

# Slots are taken in blocks of at most this fraction of the limit: each take costs a round trip to the server
# (~0.2 s), and a block much larger than the limit's per-second refill would make workers wait in bursts. The
# realtime lane also caps a block at its concurrency.
BLOCK_FRACTION = 0.1


def create_command(name: str, rpm: int) -> str:
    """The `prefect gcl create` command for a limit of `rpm` requests per minute."""
    return f"prefect gcl create {name} --limit {rpm} --slot-decay-per-second {rpm / 60:.2f}"


def limit_names(spec: str | Mapping[str, str]) -> dict[str, str]:
    """`global_rate_limit` as model (or "*") → limit name; refuses an empty mapping or an empty name."""
    names = {SharedLimit.ANY_MODEL: spec} if isinstance(spec, str) else dict(spec)
    if not names:
        raise ConfigError('global_rate_limit is an empty mapping: give a limit per model, or "*" for every model')
    blank = sorted(model for model, name in names.items() if not name.strip())
    if blank:
        raise ConfigError(f"global_rate_limit has no limit name for {', '.join(map(repr, blank))}")
    return names


def check_models(shared: SharedLimit, configured: Iterable[str]) -> None:
    """Refuse a model the config does not know: a misspelt key would leave that model unlimited without a word."""
    unknown = sorted(set(shared.names) - set(configured) - {SharedLimit.ANY_MODEL})
    if unknown:
        raise ConfigError(
            f"global_rate_limit names models the config does not have: {', '.join(map(repr, unknown))} "
            '(use the model ids of the config\'s [models.*] tables, or "*")'
        )


async def shared_rate_limit(spec: str | Mapping[str, str]) -> SharedLimit:
    """The global concurrency limits `spec` names, as one SharedLimit; fails at once if one cannot enforce
    anything (no server, missing, inactive, no slot decay)."""
    names = limit_names(spec)
    if not get_current_settings().api.url:
        raise ConfigError(
            f"global_rate_limit={spec!r} needs a Prefect server (PREFECT_API_URL); an ephemeral API is per process"
        )
    async with get_client() as client:
        limits = [await _usable_limit(client, name) for name in sorted(set(names.values()))]
    blocks = {limit.name: max(1, int(limit.limit * BLOCK_FRACTION)) for limit in limits}

    async def take(name: str, slots: int) -> None:
        # strict=True: a limit deleted mid-run raises instead of silently letting everything through.
        await rate_limit(name, occupy=slots, strict=True)

    return SharedLimit(take=take, names=names, blocks=blocks)


async def _usable_limit(client: PrefectClient, name: str) -> GlobalConcurrencyLimitResponse:
    try:
        limit = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise ConfigError(
            f"global rate limit {name!r} does not exist; create it with `{create_command(name, 1000)}` "
            "(use your account's RPM for that model class)"
        ) from None
    if not limit.active:
        raise ConfigError(f"global rate limit {name!r} is inactive; `prefect gcl enable {name}`")
    if not limit.slot_decay_per_second:
        raise ConfigError(
            f"global rate limit {name!r} has no slot decay, so it limits concurrency, not rate; recreate it with "
            f"`{create_command(name, limit.limit)}`"
        )
    return limit

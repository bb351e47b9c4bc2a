"""A Prefect global concurrency limit as the realtime lane's shared rate limit, so every worker and flow run
sending to the same API account stays under one requests-per-minute budget.

Create the limit once, with a slot decay of RPM/60 so that taken slots come back at the account's rate:

    prefect gcl create anthropic-rpm --limit 4000 --slot-decay-per-second 66.67

and pass `global_rate_limit=anthropic-rpm` to the flow. The lane's local buckets still apply on top.
"""

from __future__ import annotations

from prefect import get_client
from prefect.concurrency.asyncio import rate_limit
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from batch_engine.errors import ConfigError
from batch_engine.lanes import SharedLimit

# Slots are taken in blocks of at most this fraction of the limit: each take costs a round trip to the server
# (~0.2 s), and a block much larger than the limit's per-second refill would make workers wait in bursts.
BLOCK_FRACTION = 0.1


def create_command(name: str, rpm: int) -> str:
    """The `prefect gcl create` command for a limit of `rpm` requests per minute."""
    return f"prefect gcl create {name} --limit {rpm} --slot-decay-per-second {rpm / 60:.2f}"


async def shared_rate_limit(name: str, concurrency: int) -> SharedLimit:
    """The global concurrency limit `name` as a SharedLimit; fails at once if it cannot enforce anything."""
    if not get_current_settings().api.url:
        raise ConfigError(
            f"global_rate_limit={name!r} needs a Prefect server (PREFECT_API_URL); an ephemeral API is per process"
        )
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"global rate limit {name!r} does not exist; create it with `{create_command(name, 1000)}` "
                "(use your account's RPM)"
            ) from None
    if not limit.active:
        raise ConfigError(f"global rate limit {name!r} is inactive; `prefect gcl enable {name}`")
    if not limit.slot_decay_per_second:
        raise ConfigError(
            f"global rate limit {name!r} has no slot decay, so it limits concurrency, not rate; recreate it with "
            f"`{create_command(name, limit.limit)}`"
        )
    block = max(1, min(concurrency, int(limit.limit * BLOCK_FRACTION)))

    async def take(slots: int) -> None:
        # strict=True: a limit deleted mid-run raises instead of silently letting everything through.
        await rate_limit(name, occupy=slots, strict=True)

    return SharedLimit(take=take, block=block)

"""Where a flow run gets its Anthropic API key: a Prefect `Secret` block if one exists, else the environment."""

from __future__ import annotations

import os

from prefect.blocks.system import Secret
from pydantic import SecretStr

from batch_engine.errors import ConfigError

DEFAULT_SECRET_BLOCK = "anthropic-api-key"
ENV_VAR = "ANTHROPIC_API_KEY"


async def resolve_api_key(block_name: str = DEFAULT_SECRET_BLOCK) -> SecretStr | None:
    """The API key from the Secret block `block_name`, else `$ANTHROPIC_API_KEY`, else None."""
    # The key is never a flow parameter: parameters are stored in the Prefect DB and shown in the UI.
    try:
        block = await Secret.aload(block_name)
    except ValueError:
        # Prefect raises ValueError for "no block document with this name"; a server that cannot be reached
        # raises something else and should fail the run rather than silently fall back.
        block = None
    if block is not None:
        value = block.get()
        if not isinstance(value, str) or not value:
            raise ConfigError(f"Secret block {block_name!r} must hold the API key as a non-empty string")
        return SecretStr(value)
    from_env = os.environ.get(ENV_VAR, "")
    return SecretStr(from_env) if from_env else None

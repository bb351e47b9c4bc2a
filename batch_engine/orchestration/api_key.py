"""Where a flow run gets its API: a Prefect `Secret` block if one exists, else the environment, or the built-in
emulator when the run is simulated. The key is never a flow parameter, never returned by a task, never logged."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from prefect.blocks.system import Secret
from pydantic import SecretStr

from batch_engine.client import API_KEY_ENV, BASE_URL_ENV, ApiSettings
from batch_engine.errors import ConfigError
from batch_engine.runner import emulated_api

DEFAULT_SECRET_BLOCK = "anthropic-api-key"
ENV_VAR = API_KEY_ENV


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


@asynccontextmanager
async def api_settings(
    *, emulate: bool, state_dir: Path, config_path: Path | None, block_name: str = DEFAULT_SECRET_BLOCK
) -> AsyncIterator[ApiSettings]:
    """The API for one run: the emulator started here (simulated), or the real key and `$ANTHROPIC_BASE_URL`."""
    if emulate:
        with emulated_api(state_dir, config_path) as api:
            yield api
        return
    key = await resolve_api_key(block_name)
    if key is None:
        raise ConfigError(
            f"no API key: create the Prefect Secret block {block_name!r} or set {ENV_VAR} for the process that "
            "runs the flow, or pass emulate=true for a simulated run (nothing billed)"
        )
    yield ApiSettings(key, os.environ.get(BASE_URL_ENV) or None)

"""The API key comes from a Prefect Secret block when one exists, else from ANTHROPIC_API_KEY."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.blocks.system import Secret

from batch_engine.client import ApiSettings
from batch_engine.errors import ConfigError
from batch_engine.orchestration.api_key import api_settings, resolve_api_key

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def block_name(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"test-key-{request.node.name.replace('_', '-')[:40]}"
    yield name
    asyncio.run(_delete_block(name))


async def _delete_block(name: str) -> None:
    try:
        block = await Secret.aload(name)
    except ValueError:
        return
    await block.adelete(name)


def test_secret_block_wins_over_the_environment(block_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")
    Secret(value="sk-from-block").save(block_name, overwrite=True)

    key = asyncio.run(resolve_api_key(block_name))

    assert key is not None
    assert key.get_secret_value() == "sk-from-block"
    assert "sk-from-block" not in repr(key)


def test_missing_block_falls_back_to_the_environment(block_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")

    key = asyncio.run(resolve_api_key(block_name))

    assert key is not None
    assert key.get_secret_value() == "sk-from-env"


def test_no_block_and_no_environment_gives_no_key(block_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)

    assert asyncio.run(resolve_api_key(block_name)) is None


def test_a_block_holding_a_json_object_is_a_config_error(block_name: str) -> None:
    Secret(value={"key": "sk-nested"}).save(block_name, overwrite=True)

    with pytest.raises(ConfigError, match=block_name) as raised:
        asyncio.run(resolve_api_key(block_name))
    assert "sk-nested" not in str(raised.value)


def test_the_run_gets_the_environment_base_url_and_a_key_no_repr_shows(
    block_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")

    async def settings() -> ApiSettings:
        async with api_settings(emulate=False, state_dir=tmp_path, config_path=None, block_name=block_name) as api:
            return api

    api = asyncio.run(settings())

    assert api.base_url == "http://127.0.0.1:9"
    assert api.api_key.get_secret_value() == "sk-from-env"
    assert "sk-from-env" not in repr(api)


def test_no_block_and_no_environment_key_is_a_config_error_that_says_what_to_do(
    block_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)

    async def settings() -> None:
        async with api_settings(emulate=False, state_dir=tmp_path, config_path=None, block_name=block_name):
            pass

    with pytest.raises(ConfigError, match=rf"Secret block '{block_name}'.*ANTHROPIC_API_KEY.*emulate=true"):
        asyncio.run(settings())

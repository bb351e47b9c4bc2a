"""A shard's flow run is created once per attempt, even when Prefect's client sends the create twice (a slow
answer from a busy server): the create carries an idempotency key, and the server answers a repeat with the run it
made (what `run_deployment`'s docs say the key is for). CI saw the second run of a shard refused by the run lease,
and the sharded flow fail while the first run worked on, unwatched."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from batch_engine.orchestration import sharded


class _Server:
    """Prefect's flow-run creation as its API documents it: a create with a key it has seen returns that run."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, Any]]] = []
        self._by_key: dict[str, SimpleNamespace] = {}

    def create(self, parameters: dict[str, Any], key: str | None) -> SimpleNamespace:
        if key is not None and key in self._by_key:
            return self._by_key[key]
        run = SimpleNamespace(id=uuid.uuid4(), name=f"run-{len(self.created)}")
        self.created.append((run.name, parameters))
        if key is not None:
            self._by_key[key] = run
        return run


def _patch(monkeypatch: pytest.MonkeyPatch, server: _Server, parent: str, run_count: int) -> None:
    def run_deployment(name: str, *, parameters: dict[str, Any], timeout: int, idempotency_key: str | None = None):  # type: ignore[no-untyped-def]
        async def sent_twice() -> SimpleNamespace:
            server.create(parameters, idempotency_key)  # the first answer was too slow: the client sends it again
            return server.create(parameters, idempotency_key)

        return sent_twice()

    monkeypatch.setattr(sharded, "run_deployment", run_deployment)
    runtime = SimpleNamespace(get_id=lambda: parent, get_run_count=lambda: run_count)
    monkeypatch.setattr(sharded, "flow_run_runtime", runtime)


def test_a_shard_run_created_twice_by_the_client_is_one_run(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _Server()
    _patch(monkeypatch, server, parent="parent-1", run_count=1)

    async def start_all() -> list[Any]:
        starts = [sharded._start_shard_run("batch-orchestrator/on-demand", {"shard": n}, n, 0) for n in range(2)]
        return await asyncio.gather(*starts)

    runs = asyncio.run(start_all())
    assert [parameters for _, parameters in server.created] == [{"shard": 0}, {"shard": 1}]
    assert [run.name for run in runs] == [name for name, _ in server.created]


def test_a_rerun_and_a_retry_of_the_flow_make_new_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _Server()
    _patch(monkeypatch, server, parent="parent-1", run_count=1)
    asyncio.run(sharded._start_shard_run("d", {"shard": 0}, 0, 0))
    asyncio.run(sharded._start_shard_run("d", {"shard": 0}, 0, 1))  # the shard's worker died: it runs again
    _patch(monkeypatch, server, parent="parent-1", run_count=2)  # Prefect retries the whole sharded flow
    asyncio.run(sharded._start_shard_run("d", {"shard": 0}, 0, 0))
    _patch(monkeypatch, server, parent="parent-2", run_count=1)  # another sharded run of the same input
    asyncio.run(sharded._start_shard_run("d", {"shard": 0}, 0, 0))
    assert len(server.created) == 4

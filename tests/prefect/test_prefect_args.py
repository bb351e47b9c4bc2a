"""What the flow hands to Prefect task runs: nothing Prefect walks element by element.

Prefect resolves each task argument with `visit_collection`, which walks into lists, tuples, dicts, dataclasses and
pydantic models. A chunk's row indexes (~47k per batch at 1M tasks) walked on every submit and collect call cost
~0.65 s of event-loop stall each (issue #22). The count of visited nodes, not a time, is what is asserted.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prefect.utilities.collections import visit_collection
from prefect.utilities.engine import resolve_to_final_result

import batch_engine.orchestration.orchestrator as orchestrator
from batch_engine.lanes.batch import ChunkWork
from batch_engine.state.ledger import ChunkRecord

ROWS = 100_000


def _visits(value: Any) -> tuple[int, Any]:
    """How many nodes Prefect's engine visits resolving a task argument (its own visit function, called as its
    `_resolve_parameters` calls it), and the value the task body receives."""
    count = 0

    def visit(node: Any, context: dict[str, Any]) -> Any:
        nonlocal count
        count += 1
        return resolve_to_final_result(node, context)

    resolved = visit_collection(
        value, visit_fn=visit, return_data=True, max_depth=-1, remove_annotations=True, context={}
    )
    return count, resolved


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    async def fake_task(*args: Any) -> None:  # stands in for the Prefect task: records what it is handed
        calls.append(args)

    monkeypatch.setattr(orchestrator, "submit_chunk", fake_task)
    monkeypatch.setattr(orchestrator, "collect_batch", fake_task)
    return calls


def test_a_100k_row_chunk_is_handed_to_its_task_runs_unwalked(recorded: list[tuple[Any, ...]]) -> None:
    indexes = tuple(range(ROWS))
    work = ChunkWork("c0", indexes)
    record = ChunkRecord(
        run_key="r",
        chunk_key="c0",
        task_indexes=indexes,
        intent_at=0.0,
        batch_id="msgbatch_1",
        created_at=0.0,
        status="submitted",
        request_counts=None,
        canceled_by_us=False,
    )
    run, lanes = object(), object()  # never used by the fake task

    asyncio.run(orchestrator.TASK_PHASES.submit(run, lanes, work))  # type: ignore[arg-type]
    asyncio.run(orchestrator.TASK_PHASES.collect(run, lanes, record, True))  # type: ignore[arg-type]

    assert len(recorded) == 2
    for args, big in zip(recorded, (work, record), strict=True):
        for arg, original in zip(args[:3], (run, lanes, big), strict=True):
            visits, resolved = _visits(arg)
            assert resolved is original  # the task body still gets the object itself
            assert visits <= 2, f"Prefect visits {visits} nodes of a {type(original).__name__}"


def test_the_visit_count_sees_a_walked_chunk() -> None:
    # The measure itself: handed over as it is, a chunk of 100k rows is 100k visits.
    visits, _ = _visits(ChunkWork("c0", tuple(range(ROWS))))
    assert visits > ROWS

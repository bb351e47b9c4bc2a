"""Batch operations over the run ledger and the Batches API: list, inspect, cancel and delete batches, and collect
a run whose process is gone (what the `batch-engine batches` commands call)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch_engine.client import (
    ApiSettings,
    BatchInfo,
    RetryPolicy,
    cancel_batch,
    delete_batch,
    list_batches,
    retrieve_batch,
)
from batch_engine.errors import LedgerError
from batch_engine.models import RunSummary
from batch_engine.runner import Run
from batch_engine.state.backend import RunLedger, open_ledger
from batch_engine.state.ledger import ChunkRecord, RunRecord
from batch_engine.state.url import StateUrl, resolve_state_url

if TYPE_CHECKING:
    from batch_engine.client import AsyncClient

log = logging.getLogger("batch_engine")
_POLICY = RetryPolicy(attempts=5, max_time_s=60.0)


@dataclass(frozen=True, slots=True)
class BatchView:
    """A batch as the API reports it, with the run and chunk the ledger records it under (None: not ours)."""

    info: BatchInfo
    run_key: str | None = None
    chunk_key: str | None = None

    def as_json(self) -> dict[str, Any]:
        info = self.info
        return {
            "id": info.id,
            "status": info.status,
            "request_counts": info.request_counts,
            "created_at": info.created_at,
            "ended_at": info.ended_at,
            "archived": info.archived,
            "run_key": self.run_key,
            "chunk": self.chunk_key,
        }


def find_run(ledger: RunLedger, key: str) -> RunRecord:
    """The run recorded under `key`, or under the one run key starting with it."""
    record = ledger.run(key)
    if record is not None:
        return record
    matches = [run for run in ledger.runs() if run.run_key.startswith(key)] if key else []
    if len(matches) == 1:
        return matches[0]
    where = ledger.where
    if matches:
        raise LedgerError(f"run key {key!r} is ambiguous in {where}: {', '.join(r.run_key for r in matches)}")
    raise LedgerError(f"no run {key!r} in {where} (`batch-engine batches list` shows recent batches and their runs)")


def _view(ledger: RunLedger, info: BatchInfo, chunk: ChunkRecord | None = None) -> BatchView:
    chunk = chunk or ledger.chunk_by_batch(info.id)
    return BatchView(info, chunk.run_key if chunk else None, chunk.chunk_key if chunk else None)


async def _retrieve(client: AsyncClient, batch_id: str) -> BatchInfo:
    return await _POLICY.call(lambda: retrieve_batch(client, batch_id))


async def list_views(
    client: AsyncClient, ledger: RunLedger, *, run_key: str | None = None, days: float = 7.0, limit: int = 50
) -> list[BatchView]:
    """A run's batches in submission order (live status), or the API's recent batches, newest first."""
    if run_key is not None:
        chunks = [chunk for chunk in ledger.chunks(find_run(ledger, run_key).run_key) if chunk.batch_id]
        infos = await asyncio.gather(*(_retrieve(client, chunk.batch_id) for chunk in chunks if chunk.batch_id))
        return [_view(ledger, info, chunk) for info, chunk in zip(infos, chunks, strict=True)]
    since = time.time() - days * 86_400
    found = await _POLICY.call(lambda: list_batches(client, created_after=since, limit=limit))
    return [_view(ledger, info) for info in found]


async def status(client: AsyncClient, ledger: RunLedger, batch_id: str) -> BatchView:
    """One batch, live, with the run and chunk it belongs to."""
    return _view(ledger, await _retrieve(client, batch_id))


async def cancel(
    client: AsyncClient, ledger: RunLedger, *, run_key: str | None = None, batch_id: str | None = None
) -> list[BatchView]:
    """Cancel one batch a run recorded, or every batch of a run still in progress; returns what the API says after.

    Cancelled rows come back `canceled`; a later `run` of the same file resubmits them (the run is not
    forgotten), and `collect` finishes the run with whatever the batches had done by then.
    """
    if (run_key is None) == (batch_id is None):
        raise ValueError("cancel takes a run key or a batch id")
    if batch_id is not None:
        if ledger.chunk_by_batch(batch_id) is None:
            # Never cancel what is not proven ours: on a shared key it may be another job's.
            raise LedgerError(
                f"batch {batch_id} is not recorded by any run in {ledger.where}, so it may be another job's; "
                "not cancelling it (pass the --state-dir of the run that made it, or cancel it in the Console)"
            )
        targets = [await _retrieve(client, batch_id)]
    else:
        assert run_key is not None
        record = find_run(ledger, run_key)
        ids = [chunk.batch_id for chunk in ledger.chunks(record.run_key) if chunk.batch_id and chunk.open]
        targets = list(await asyncio.gather(*(_retrieve(client, batch) for batch in ids)))
    after = await asyncio.gather(*(_cancel(client, info) for info in targets))
    return [_view(ledger, info) for info in after]


async def _cancel(client: AsyncClient, info: BatchInfo) -> BatchInfo:
    if info.status != "in_progress":
        return info
    return await _POLICY.call(lambda: cancel_batch(client, info.id))


async def delete(client: AsyncClient, ledger: RunLedger, batch_id: str) -> BatchView:
    """Delete an ended batch and its results; refused for a batch whose results a run has not collected yet."""
    chunk = ledger.chunk_by_batch(batch_id)
    if chunk is not None and chunk.open:
        raise LedgerError(
            f"batch {batch_id} holds chunk {chunk.chunk_key} of run {chunk.run_key}, whose results are not collected "
            f"yet; collect them first (`batch-engine batches collect --run {chunk.run_key} -o OUT`)"
        )
    info = await _retrieve(client, batch_id)
    if info.status != "ended":
        raise LedgerError(f"batch {batch_id} is {info.status}: only an ended batch can be deleted; cancel it first")
    await _POLICY.call(lambda: delete_batch(client, batch_id))
    return _view(ledger, info, chunk)


@dataclass(frozen=True, slots=True)
class Collected:
    """What `collect` did: the run summary when the output was written, else the batches still running."""

    summary: RunSummary | None
    running: list[str]


def reopen(state_dir: Path, run_key: str, output_path: Path, state: StateUrl | None = None) -> Run:
    """A recorded run opened again in this process, writing to `output_path`, from the ledger at `state` (the
    SQLite files in `state_dir` when None)."""
    state = state or resolve_state_url(None, state_dir)
    with open_ledger(state) as ledger:
        record = find_run(ledger, run_key)
    run = Run.reopen(record, state_dir, state)
    run.output_path = output_path
    return run


async def collect(
    run: Run,
    api: ApiSettings,
    *,
    wait: bool = False,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> Collected:
    """Finish a run whose process is gone, in this process: the run's collect phase, then `finish` once no batch is
    left running (see `Run.collect_once`; the `batch-collect` flow calls the same phases as task runs).

    Ended batches are collected (an archived one, past the 29-day results window, turns its rows into errored
    rows instead of being retried); chunks whose create was interrupted are reconciled or submitted. With
    `wait`, running batches are waited for (and cancelled at the run's batch timeout, as `run` does); without,
    the output is only written once none is left running, so `collect` can simply be called again later.
    """
    if not run.completed:
        async with run.lanes(api, logger=logger or log) as lanes:
            running = await run.collect_once(lanes, wait=wait)
        if running:
            return Collected(None, running)
    return Collected(run.finish(), [])

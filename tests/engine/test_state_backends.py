"""The state backend interface, on both implementations: the SQLite files (the default) and a real PostgreSQL
database. What a run relies on — the intent/create/record sequence, the result replacement rule, the usage log's
request keys, the run lease — holds on both; the PostgreSQL tests also run several processes at once, as several
workers on several machines would."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from batch_engine.errors import ConfigError, LedgerError, RunBusyError
from batch_engine.models import TaskResult, Usage
from batch_engine.planning.outcome import FinishedRow
from batch_engine.state import pg_ledger, pg_usage_log
from batch_engine.state.backend import RunLedger, open_ledger, open_usage_log
from batch_engine.state.lease import RunLease, holder_alive
from batch_engine.state.ledger import Lease
from batch_engine.state.url import ENV_STATE_URL, parse_state_url, redact, resolve_state_url
from batch_engine.state.usage_log import UsageRecord
from tests.support.postgres import PostgresServer
from tests.support.usage import usage_row


def _ledger(url: str) -> RunLedger:
    return open_ledger(parse_state_url(url))


def _result(index: int, status: str = "succeeded", attempts: int = 1, cost: float = 0.01) -> FinishedRow:
    result = TaskResult(
        index=index,
        task_id=f"t{index}",
        task_type="classify",
        status=status,  # type: ignore[arg-type]
        route="batch",
        model="claude-haiku-5-5",
        attempts=attempts,
        cost_usd=cost,
        usage=Usage(input_tokens=10, output_tokens=5),
    )
    return FinishedRow.of(result)


def _usage(request_key: str | None, at: float, output_tokens: int = 7, run_key: str = "r1") -> UsageRecord:
    return usage_row(
        at=at,
        run_key=run_key,
        task_type="classify",
        input_tokens=10,
        output_tokens=output_tokens,
        cost_usd=0.001,
        baseline_usd=0.002,
        max_tokens=100,
        route_reason="bulk",
        request_key=request_key,
    )


def test_the_intent_create_record_sequence_and_the_run_records_read_back_the_same(state_url: str) -> None:
    with _ledger(state_url) as ledger:
        first = ledger.begin("run1", "in.jsonl", "out.json", {"mode": None, "n": 1}, 100.0)
        again = ledger.begin("run1", "in.jsonl", "elsewhere.json", {"ignored": True}, 200.0)
        assert (again.started_at, again.options, again.output_path) == (100.0, first.options, "elsewhere.json")
        assert not ledger.has_work("run1")

        intent = ledger.record_intent("run1", "c0", [3, 1, 2], 101.0)
        # A second intent for the same chunk (a retry, a crash before create) keeps the first.
        assert ledger.record_intent("run1", "c0", [9], 102.0) == intent
        assert (intent.status, intent.task_indexes, intent.sent_at, intent.batch_id) == (
            "intent",
            (3, 1, 2),
            None,
            None,
        )
        ledger.record_send("run1", "c0", 103.0)
        ledger.record_send("run1", "c0", 104.0)
        ledger.record_batch("run1", "c0", "msgbatch_a", 105.0)
        ledger.update_chunk("run1", "c0", status="ended", request_counts={"succeeded": 3}, canceled_by_us=True)
        chunk = ledger.chunk("run1", "c0")
        assert chunk is not None and chunk.open
        assert (chunk.sent_at, chunk.last_sent_at, chunk.batch_id, chunk.created_at) == (
            103.0,
            104.0,
            "msgbatch_a",
            105.0,
        )
        assert (chunk.status, chunk.request_counts, chunk.canceled_by_us) == ("ended", {"succeeded": 3}, True)
        assert ledger.chunk_by_batch("msgbatch_a") == chunk and ledger.chunk_by_batch("nope") is None
        assert ledger.known_batch_ids() == {"msgbatch_a"} and ledger.has_work("run1")

        ledger.set_run_status("run1", "complete", 300.0)
        assert [(r.run_key, r.status, r.finished_at) for r in ledger.runs("complete")] == [("run1", "complete", 300.0)]
        assert ledger.runs("running") == []
    # Durable: another connection (another process, another machine) reads the same.
    with _ledger(state_url) as other:
        assert other.chunks("run1") == [chunk]


def test_a_stored_success_is_never_replaced_and_a_later_attempt_replaces_an_error(state_url: str) -> None:
    with _ledger(state_url) as ledger:
        ledger.begin("run1", "in", "out", {}, 1.0)
        ledger.save_results("run1", [_result(0), _result(1, "errored", 1, 0.0), _result(2, "errored", 2, 0.0)], 10.0)
        # A second collection of an older answer, and a newer attempt for the errored rows.
        ledger.save_results(
            "run1", [_result(0, "errored", 2, 0.0), _result(1, "succeeded", 2), _result(2, "errored", 1, 0.5)], 20.0
        )
        rows = {row.index: row for row in ledger.results("run1")}
        assert [rows[i].status for i in range(3)] == ["succeeded", "succeeded", "errored"]
        assert rows[2].attempts == 2 and rows[2].cost_usd == 0.0  # the row sent fewer times did not win
        assert ledger.finished_indexes("run1") == {0, 1, 2} and list(ledger.iter_finished_indexes("run1")) == [0, 1, 2]
        assert ledger.spent("run1") == pytest.approx(0.02)
        assert ledger.last_recorded("run1") == {"batch": 20.0}
        assert [index for index, _ in ledger.result_json("run1")] == [0, 1, 2]
        assert TaskResult.model_validate_json(dict(ledger.result_json("run1"))[1]) == rows[1]
        ledger.save_results("run1", [_result(5, "invalid_output"), _result(6, "invalid_output")], 30.0)
        assert [r.index for r in ledger.invalid_outputs("run1")] == [5, 6]
        assert [r.index for r in ledger.invalid_outputs("run1", [6, 7])] == [6]
        assert ledger.invalid_outputs("run1", []) == []


def test_a_large_block_of_results_follows_the_same_rule(state_url: str) -> None:
    """A batch's results arrive in blocks of thousands (PostgreSQL copies those in): the same rule per row."""
    with _ledger(state_url) as ledger:
        ledger.begin("run1", "in", "out", {}, 1.0)
        ledger.save_results("run1", [_result(0), _result(1, "errored", 2, 0.0)], 10.0)
        block = [_result(i, "errored", 1, 0.0) for i in range(500)]
        block += [_result(2, "succeeded", 1), _result(3, "errored", 3, 0.0)]  # the same tasks again, later
        ledger.save_results("run1", block, 20.0)
        rows = {row.index: row for row in ledger.results("run1")}
        assert len(rows) == 500 and ledger.finished_indexes("run1") == set(range(500))
        assert (rows[0].status, rows[1].attempts) == ("succeeded", 2)  # kept: a success, a row sent more times
        assert (rows[2].status, rows[3].attempts, rows[4].status) == ("succeeded", 3, "errored")


def test_supersede_moves_unchanged_rows_and_open_batches_in_one_step(state_url: str) -> None:
    with _ledger(state_url) as ledger:
        ledger.begin("old", "in", "out", {}, 1.0)
        ledger.begin("new", "in", "out", {}, 2.0)
        ledger.save_results("old", [_result(0), _result(1)], 3.0)
        ledger.record_intent("old", "c0", [2, 3], 4.0)
        ledger.record_batch("old", "c0", "msgbatch_old", 5.0)
        # A batch none of whose rows is unchanged moves too: the new run collects it to log what it billed.
        ledger.record_intent("old", "c1", [4], 4.5)
        ledger.record_batch("old", "c1", "msgbatch_changed", 5.5)

        moved = ledger.supersede("old", "new", {0, 3}, 6.0)

        assert moved == ["msgbatch_old", "msgbatch_changed"]
        assert ledger.finished_indexes("new") == {0} and ledger.finished_indexes("old") == {1}
        chunks = ledger.chunks("new")
        assert [(c.chunk_key, c.task_indexes) for c in chunks] == [("c0@old", (3,)), ("c1@old", ())]
        old = ledger.run("old")
        assert old is not None and old.status == "superseded"


def test_the_usage_log_keeps_one_row_per_request_key_and_reads_the_newest_first(state_url: str) -> None:
    state = parse_state_url(state_url)
    with open_usage_log(state) as log:
        log.append([_usage("batch:b1:t1", 10.0, 1), _usage("batch:b1:t2", 20.0, 2), _usage(None, 30.0, 3)])
        # Collected again after a crash: nothing logged twice; a record without a key is always new.
        log.append([_usage("batch:b1:t1", 40.0, 4), _usage(None, 50.0, 5, "r2")])
        log.append([])
    with open_usage_log(state) as log:
        assert [r.output_tokens for r in log.records()] == [1, 2, 3, 5]
        assert [r.output_tokens for r in log.records(since=25.0)] == [3, 5]
        assert [r.output_tokens for r in log.records(run_key="r2")] == [5]
        assert [tokens for *_, tokens in log.recent_outputs(limit=3)] == [5, 3, 2]
        assert log.records()[0] == _usage("batch:b1:t1", 10.0, 1)


def test_a_large_block_of_usage_records_keeps_one_row_per_request_key(state_url: str) -> None:
    """A batch's usage arrives in blocks of thousands (SQLite inserts them many rows a statement): a key repeated
    inside one block, or logged by an earlier block, is logged once, as first written, and the order holds."""
    state = parse_state_url(state_url)
    with open_usage_log(state) as log:
        log.append([_usage("batch:b1:t0", 1.0, 1)])
        block = [_usage(f"batch:b1:t{i}", 10.0 + i, 100 + i) for i in range(200)]
        block[5] = _usage("batch:b1:t3", 15.0, 999)  # repeats a key earlier in the same statement's rows
        block[150] = _usage("batch:b1:t149", 160.0, 999)  # ... in a later statement's
        block += [_usage(None, 300.0, 7), _usage(None, 301.0, 7)]  # without a key: always new
        log.append(block)
    with open_usage_log(state) as log:
        records = log.records()
    kept = [1] + [100 + i for i in range(1, 200) if i not in (5, 150)] + [7, 7]
    assert [r.output_tokens for r in records] == kept
    assert records[1] == _usage("batch:b1:t1", 11.0, 101)


def test_a_lease_is_taken_over_only_when_its_owner_is_gone(state_url: str) -> None:
    here = socket.gethostname()
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    assert dead.pid is not None
    cases = {
        "live here": (Lease("a", "x", here, os.getpid(), time.time(), time.time() + 600), True),
        "dead pid here": (Lease("b", "x", here, dead.pid, time.time(), time.time() + 600), False),
        "other host, heartbeat fresh": (Lease("c", "x", "elsewhere", 1, time.time(), time.time() + 600), True),
        "other host, heartbeat expired": (Lease("d", "x", "elsewhere", 1, time.time(), time.time() - 1), False),
    }
    with _ledger(state_url) as holder, _ledger(state_url) as ledger:
        for name, (held, busy) in cases.items():
            assert holder.take_lease(held, holder_alive) is None
            lease = RunLease(ledger, held.run_key)
            if busy:
                with pytest.raises(RunBusyError, match=f"pid {held.pid} on {held.host}"):
                    lease.take()
                assert ledger.lease_alive(held, holder_alive), name
            else:
                lease.take()  # taken over
                assert lease.renew(), name
                assert not holder.renew_lease(held.run_key, "x", time.time(), time.time() + 600), name
                taken = ledger.lease(held.run_key)
                assert taken is not None and (taken.owner, taken.host, taken.pid) == (lease.owner, here, os.getpid())


def test_a_worker_on_another_machine_that_died_loses_its_lease_with_its_database_session(pg_url: str) -> None:
    """Its heartbeat is fresh and its pid is not ours to check, but its connection is gone: taken over at once."""
    elsewhere = Lease("run", "worker-b", "machine-b", 4242, time.time(), time.time() + 600)
    gone = _ledger(pg_url)
    assert gone.take_lease(elsewhere, holder_alive) is None
    live = _ledger(pg_url)
    try:
        with pytest.raises(RunBusyError, match="pid 4242 on machine-b"):
            RunLease(live, "run").take()
        gone.close()  # the worker's process (or machine) died: the server drops its session
        deadline = time.monotonic() + 10
        while True:
            try:
                RunLease(live, "run").take()
                break
            except RunBusyError:
                assert time.monotonic() < deadline, "the dead session's lease was never taken over"
                time.sleep(0.05)
    finally:
        live.close()


def _take(url: str, run_key: str, start: float, results: multiprocessing.Queue[str], done: Any) -> None:
    with _ledger(url) as ledger:
        time.sleep(max(0.0, start - time.time()))

        def slow_alive(held: Lease) -> bool:
            time.sleep(0.3)  # wide open: the decision and the write must happen under the row's lock
            return holder_alive(held)

        mine = Lease(run_key, str(os.getpid()), socket.gethostname(), os.getpid(), time.time(), time.time() + 600)
        results.put("taken" if ledger.take_lease(mine, slow_alive) is None else "busy")
        done.wait(60)  # a worker that took it keeps it (its session open) until every worker has tried


def test_of_many_workers_taking_one_lease_at_once_exactly_one_gets_it(pg_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[str] = context.Queue()
    # A lease left by a worker that died: every worker sees it may be taken over, and races to take it.
    with _ledger(pg_url) as gone:
        gone.take_lease(Lease("run", "dead", "machine-b", 4242, time.time(), time.time() - 1), holder_alive)
    start = time.time() + 5.0
    done = context.Barrier(6)
    workers = [context.Process(target=_take, args=(pg_url, "run", start, results, done)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(90)
    assert sorted(results.get(timeout=5) for _ in workers) == ["busy"] * 5 + ["taken"]


def _connect(url: str, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))
    open_ledger(parse_state_url(url)).close()
    open_usage_log(parse_state_url(url)).close()


def test_workers_starting_at_once_migrate_a_new_database_exactly_once(pg_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    start = time.time() + 3.0
    workers = [context.Process(target=_connect, args=(pg_url, start)) for _ in range(5)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * 5
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT component, version FROM batch_engine_schema ORDER BY component").fetchall()
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    # Every migration applied once: a second application of any of them would have failed (CREATE TABLE).
    assert rows == [("ledger", len(pg_ledger.MIGRATIONS)), ("usage_log", len(pg_usage_log.MIGRATIONS))]
    assert {"batch_engine_schema", "runs", "chunks", "leases", "results", "usage"} <= {name for (name,) in tables}


def test_a_database_of_a_newer_batch_engine_is_refused(pg_url: str) -> None:
    _ledger(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE batch_engine_schema SET version = 99 WHERE component = 'ledger'")
    with pytest.raises(LedgerError, match="version 99, newer than"):
        _ledger(pg_url)


def test_the_state_url_comes_from_the_flag_the_environment_the_config_or_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_server: PostgresServer
) -> None:
    monkeypatch.delenv(ENV_STATE_URL, raising=False)
    assert resolve_state_url(None, tmp_path).directory == tmp_path
    assert resolve_state_url(None, tmp_path, "sqlite:////srv/state").directory == Path("/srv/state")
    monkeypatch.setenv(ENV_STATE_URL, "postgresql+asyncpg://team:s3cret@db.internal:5432/batch")
    from_env = resolve_state_url(None, tmp_path, "sqlite:///ignored")
    assert from_env.dsn == "postgresql://team:s3cret@db.internal:5432/batch"
    assert from_env.shown == "postgresql://team:***@db.internal:5432/batch"
    assert resolve_state_url("sqlite:///here", tmp_path).directory == Path("here")
    with pytest.raises(ConfigError, match=r"state_url 'mysql://u:\*\*\*@h/d': expected sqlite"):
        parse_state_url("mysql://u:pw@h/d")
    assert redact("postgresql://u@h/d") == "postgresql://u@h/d"
    # An unreachable server is one clean line naming the URL without its password.
    with pytest.raises(
        Exception, match=r"postgresql://u:\*\*\*@127.0.0.1:1/d\?connect_timeout=2: cannot connect"
    ) as raised:
        open_ledger(parse_state_url("postgresql://u:pw@127.0.0.1:1/d?connect_timeout=2"))
    assert "pw" not in str(raised.value)

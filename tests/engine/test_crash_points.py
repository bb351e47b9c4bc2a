"""Kill -9 at every crash point, run the same command again, and nothing is lost, doubled or sent twice.

For each point in `batch_engine.crashpoints.CRASH_POINTS` a real `batch-engine run` process
(tests/support/crash_driver.py) is SIGKILLed there by `BATCH_ENGINE_CRASH_AT`, against an emulator that outlives it
(batch rows erroring 10% of the time, so rows are resubmitted). Every point is killed on the in-process path (no
Prefect server configured, what `batch-engine run` does by default); a kill point inside each of the flow's task
runs is killed on the flow path too (`PREFECT_API_URL` set: the `batch-orchestrator` flow on a real `prefect
server start`). Then the same command runs again, unarmed, on the same path, and:

- the output holds every task once, in input order, each answered by its own request;
- the emulator holds exactly one batch per ledger chunk (no orphan from a lost create, no duplicate payload)
  and never billed a custom_id's success twice;
- no task finished before the kill was sent again (no later batch carries it; realtime successes billed
  after the kill are exactly the rows the re-run finished) and its row is unchanged.

Every point is also killed with the run's state in PostgreSQL (the `postgresql` path: in-process, `--state-url`
naming a database of its own on the session's PostgreSQL server) instead of the SQLite files. Scenarios run a few
at a time, each with its own emulator; `-k POINT` runs only the selected ones (`-k flow`: the flow path's;
`-k postgresql`: the PostgreSQL state's).
"""

from __future__ import annotations

import contextlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batch_engine import crashpoints
from batch_engine.config import load_config
from batch_engine.crashpoints import CRASH_POINTS
from batch_engine.emulator import EmulatorSettings, start_emulator
from batch_engine.state.backend import open_ledger, open_usage_log
from batch_engine.state.url import StateUrl, parse_state_url
from tests.support.crash import Finished, config_file, emulator_batches, run_driver, run_driver_process
from tests.support.engine import expected_text_prefix, generated_tasks, read_output, write_jsonl
from tests.support.postgres import PostgresServer
from tests.support.prefect_server import running_server

PARALLEL = 3
# The first test runs every selected scenario (the `outcomes` fixture): ~1-2 min in-process, ~3-5 more for the
# flow path on the loaded 2-core machine.
pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Shape:
    """A task file, its config and run flags, and the emulator it runs against."""

    tasks: int
    max_requests_per_batch: int
    emulator: dict[str, Any]
    flags: tuple[str, ...] = ()
    realtime_every: int = 3


SHAPES = {
    # 90 batch rows in two chunks (10% of rows error and are resubmitted) + 30 realtime tasks.
    "mixed": Shape(120, 45, {"batch_duration_s": 0.1, "batch_row_error_rate": 0.1}, realtime_every=4),
    # One 1,200-row batch: its results are stored in two transactions, so a kill can fall between them.
    "big": Shape(1200, 2000, {"batch_duration_s": 0.1, "batch_row_error_rate": 0.1}, ("--batch-only",)),
    # A batch that cannot end before the 1.5 s batch timeout: cancelled, its rows sent realtime.
    "timeout": Shape(60, 100, {"batch_duration_s": 60.0}, ("--batch-timeout", "1.5")),
}

# (BATCH_ENGINE_CRASH_AT, shape): every crash point once; `:N` dies on the N-th hit.
SCENARIOS = {
    "plan.started": "mixed",
    "plan.done": "mixed",
    "preflight.done": "mixed",
    "batch.intent": "mixed",
    "batch.create.before": "mixed",
    "batch.create.after": "mixed",
    "batch.recorded": "mixed",
    "batch.polled:2": "mixed",
    "batch.ended": "mixed",
    "batch.results.partial": "big",
    "batch.results.stored": "mixed",
    "batch.collected": "mixed",
    "batch.resubmit.before": "mixed",
    "batch.resubmit.recorded": "mixed",
    "batch.cancel.recorded": "timeout",
    "batch.canceled": "timeout",
    "realtime.sending:10": "mixed",
    "realtime.answered:10": "mixed",
    "realtime.recorded:10": "mixed",
    "usage.logged:3": "mixed",
    "leftovers.before": "timeout",
    "output.before": "mixed",
    "output.partial:40": "mixed",
    "output.before_rename": "mixed",
    "output.renamed": "mixed",
    "run.complete": "mixed",
}
# Points only the flow path has (they sit in its task bodies, around the one call into `Run`).
FLOW_ONLY = {"flow.artifacts.published"}
# The flow path: one point inside each of the flow's task runs (plan, begin, submit-c0, collect-c0, realtime-lane,
# realtime-leftovers, merge-and-write, publish-artifacts). Not every point: each flow-path scenario is two fresh
# processes importing Prefect and talking to its server (~15-25 s each on the loaded 2-core machine, against
# ~2 s for a forked in-process run), so the whole matrix there would take ~10 minutes; the points in between
# run the same `Run` code on both paths, which the in-process matrix covers.
FLOW_SCENARIOS = {
    "plan.done": "mixed",
    "preflight.done": "mixed",
    "batch.create.after": "mixed",
    "batch.results.stored": "mixed",
    "realtime.recorded:10": "mixed",
    "leftovers.before": "timeout",
    "output.renamed": "mixed",
    "flow.artifacts.published": "mixed",
}
PATHS = [("in-process", point) for point in SCENARIOS] + [("flow", point) for point in FLOW_SCENARIOS]
PATHS += [("postgresql", point) for point in SCENARIOS]
# Points past which the output is in place: a kill there leaves it.
OUTPUT_WRITTEN = {"output.renamed", "run.complete", "flow.artifacts.published"}


@dataclass
class Outcome:
    """What one scenario observed, for the assertions."""

    path: str
    point: str
    tasks: list[dict[str, Any]]
    crash_code: int
    crash_stderr: str
    output_after_crash: bool
    finished_at_kill: dict[int, dict[str, Any]]
    batches_at_kill: set[str]
    realtime_billed_at_kill: int
    rerun_code: int = -1
    rerun_stderr: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    chunk_batches: list[str] = field(default_factory=list)
    emulator_batches: dict[str, set[str]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, tuple[int, float]] = field(default_factory=dict)  # route → (rows, USD) in the usage log


def _settled_stats(emulator: Any) -> dict[str, Any]:
    # A request the killed process sent may still be answered (and billed) just after it died.
    previous = emulator.stats()
    while True:
        time.sleep(0.1)
        current = emulator.stats()
        if current["messages_succeeded"] == previous["messages_succeeded"]:
            return current
        previous = current


def _ledger_state(state: StateUrl) -> tuple[dict[int, dict[str, Any]], list[str]]:
    with open_ledger(state) as ledger:
        runs = ledger.runs()
        if not runs:
            return {}, []
        (run,) = runs
        rows = {row.index: row.model_dump(mode="json") for row in ledger.results(run.run_key)}
        batches = [chunk.batch_id for chunk in ledger.chunks(run.run_key) if chunk.batch_id is not None]
        return rows, batches


def _scenario(
    path: str, point: str, root: Path, prefect_api_url: str | None, pg: PostgresServer | None = None
) -> Outcome:
    shape = SHAPES[(FLOW_SCENARIOS if path == "flow" else SCENARIOS)[point]]
    work = root / path / point.replace(":", "_")
    work.mkdir(parents=True)
    tasks = generated_tasks(shape.tasks, realtime_every=shape.realtime_every)
    write_jsonl(work / "tasks.jsonl", tasks)
    config_file(
        work / "config.toml",
        batch_poll_initial_s=0.05,
        batch_poll_interval_s=0.2,
        max_requests_per_batch=shape.max_requests_per_batch,
    )
    args = ["tasks.jsonl", "-o", "out.json", "--state-dir", "state", "--config", "config.toml", *shape.flags]
    url = f"sqlite:///{work / 'state'}" if pg is None else pg.create_database()
    state = parse_state_url(url)
    args += ["--state-url", url]

    def run(crash_at: str | None = None) -> Finished:
        if prefect_api_url is None:
            return run_driver(work, emulator.base_url, args, crash_at=crash_at)
        return run_driver_process(work, emulator.base_url, args, crash_at=crash_at, prefect_api_url=prefect_api_url)

    with start_emulator(EmulatorSettings(**shape.emulator)) as emulator:
        crashed = run(crash_at=point)
        stats = _settled_stats(emulator)
        finished, batches = _ledger_state(state)
        outcome = Outcome(
            path=path,
            point=point,
            tasks=tasks,
            crash_code=crashed.returncode,
            crash_stderr=crashed.stderr[-2000:],
            output_after_crash=(work / "out.json").exists(),
            finished_at_kill=finished,
            batches_at_kill=set(batches),
            realtime_billed_at_kill=stats["messages_succeeded"],
        )
        rerun = run()
        outcome.rerun_code, outcome.rerun_stderr = rerun.returncode, rerun.stderr[-2000:]
        if rerun.returncode in (0, 1):
            outcome.rows = read_output(work / "out.json")[1]
        outcome.chunk_batches = _ledger_state(state)[1]
        outcome.emulator_batches = {info.id: ids for info, ids in emulator_batches(emulator.base_url)}
        outcome.stats = _settled_stats(emulator)
    with open_usage_log(state) as log:
        for record in log.records():
            rows, cost = outcome.usage.get(record.route, (0, 0.0))
            outcome.usage[record.route] = (rows + 1, cost + record.cost_usd)
    return outcome


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Outcome]:
    """Every selected scenario, run `PARALLEL` at a time (each waits mostly on its processes and batches); the
    flow path's against one `prefect server start`, started only when one of them is selected."""
    selected = [
        (item.callspec.params["path"], item.callspec.params["point"])
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "point" in item.callspec.params
    ]
    root = tmp_path_factory.mktemp("crash")
    pg = request.getfixturevalue("postgres_server") if any(path == "postgresql" for path, _ in selected) else None
    with contextlib.ExitStack() as stack:
        api_url = None
        if any(path == "flow" for path, _ in selected):
            home = tmp_path_factory.mktemp("crash-prefect-home")
            api_url = stack.enter_context(running_server(home, request.getfixturevalue("migrated_prefect_db"))).api_url
        with ThreadPoolExecutor(PARALLEL) as pool:
            futures = {
                (path, point): pool.submit(
                    _scenario,
                    path,
                    point,
                    root,
                    api_url if path == "flow" else None,
                    pg if path == "postgresql" else None,
                )
                for path, point in dict.fromkeys(selected)
            }
            return {key: future.result() for key, future in futures.items()}


def test_every_crash_point_is_in_the_code_and_has_a_scenario() -> None:
    package = Path(crashpoints.__file__).parent
    called = {
        name
        for path in package.rglob("*.py")
        for line in path.read_text().splitlines()
        if "crash_point(" in line and "def crash_point" not in line
        for name in re.findall(r'"([a-z_.]+)"', line)
    }
    assert len(CRASH_POINTS) >= 20
    assert called == set(CRASH_POINTS)
    assert {point.partition(":")[0] for point in SCENARIOS} == set(CRASH_POINTS) - FLOW_ONLY
    assert {point.partition(":")[0] for point in FLOW_SCENARIOS} >= FLOW_ONLY


@pytest.mark.parametrize(("path", "point"), PATHS, ids=[f"{path}-{point}" for path, point in PATHS])
def test_a_run_killed_here_completes_on_rerun_without_duplicates(
    path: str, point: str, outcomes: dict[tuple[str, str], Outcome]
) -> None:
    outcome = outcomes[path, point]
    assert outcome.crash_code == -9, f"the run was not killed at {point}: {outcome.crash_stderr}"
    if point.partition(":")[0] not in OUTPUT_WRITTEN:
        assert not outcome.output_after_crash, "a killed run left an output file"

    assert outcome.rerun_code in (0, 1), outcome.rerun_stderr
    config = load_config()
    tasks, rows = outcome.tasks, outcome.rows
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks], "not every task once, in order"
    for task, row in zip(tasks, rows, strict=True):
        if row["status"] == "succeeded":
            assert row["text"].startswith(expected_text_prefix(task, row, config)), row
        else:  # a row that errored on all of its attempts (10% per attempt)
            assert row["error"]["type"] == "api_error" and row["attempts"] == config.limits.max_row_attempts, row

    # Exactly one batch per chunk: every batch the API holds is a chunk's, and no chunk has two.
    stats = outcome.stats
    assert set(outcome.emulator_batches) == set(outcome.chunk_batches)
    assert len(outcome.chunk_batches) == len(set(outcome.chunk_batches))
    assert stats["batches_created"] == len(outcome.chunk_batches)
    # The same rows in two batches happens legitimately when every row of a resubmission failed again; each of
    # those batches is a chunk of its own (checked above), so the emulator's count must be just those repeats.
    payloads = [frozenset(ids) for ids in outcome.emulator_batches.values()]
    assert stats["duplicate_batch_payloads"] == len(payloads) - len(set(payloads))
    assert stats["duplicate_succeeded_custom_ids"] == 0

    # Nothing finished before the kill was sent again, and its row is the one recorded then.
    done_ids = {outcome.finished_at_kill[index]["task_id"] for index in outcome.finished_at_kill}
    for batch_id, custom_ids in outcome.emulator_batches.items():
        if batch_id not in outcome.batches_at_kill:
            assert not custom_ids & done_ids, f"batch {batch_id} resent tasks finished before the kill"
    realtime_after_kill = [
        row
        for row in rows
        if row["route"] == "realtime" and row["status"] == "succeeded" and row["index"] not in outcome.finished_at_kill
    ]
    assert stats["messages_succeeded"] - outcome.realtime_billed_at_kill == len(realtime_after_kill)
    for index, before in outcome.finished_at_kill.items():
        assert rows[index] == before

    # The usage log is what the API billed: every batch row once, to the cent; realtime requests too, except
    # those in flight at the kill (billed, never answered to anyone: at most one per realtime worker).
    batch_rows, batch_cost = outcome.usage.get("batch", (0, 0.0))
    assert batch_cost == pytest.approx(stats["cost_usd"]["batch"], abs=1e-9)
    assert batch_rows == sum(row["status"] == "succeeded" and row["route"] == "batch" for row in rows)
    realtime_rows, realtime_cost = outcome.usage.get("realtime", (0, 0.0))
    assert 0 <= stats["messages_succeeded"] - realtime_rows <= config.limits.realtime_concurrency
    assert realtime_cost <= stats["cost_usd"]["realtime"] + 1e-9

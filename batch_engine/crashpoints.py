"""Named kill points for crash tests: `crash_point(name)` SIGKILLs the process when `BATCH_ENGINE_CRASH_AT` names
that point (`name`, or `name:N` for its N-th hit). Unarmed, a call is one dict lookup.

SIGKILL, not an exception: nothing runs after it (no `finally`, no atexit, no flush), which is what a power cut,
an OOM kill or a preempted worker does to a run. The tests in tests/engine/test_crash_points.py kill a run at each
point and prove a re-run loses nothing and creates no batch twice.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "BATCH_ENGINE_CRASH_AT"

# Every point, where it sits, and what a kill there leaves behind.
CRASH_POINTS: dict[str, str] = {
    "plan.started": "input planned and run record written, nothing sent",
    "plan.done": "input planned, nothing sent",
    "preflight.done": "estimate made, nothing sent",
    "batch.intent": "chunk intent written, create not sent",
    "batch.create.before": "create about to be sent",
    "batch.create.after": "create answered, batch id not recorded (the ambiguous create)",
    "batch.recorded": "batch id recorded",
    "batch.polled": "a poll answered and its status recorded",
    "batch.ended": "batch seen ended, results not fetched",
    "batch.results.partial": "some result rows of a batch stored, the rest not",
    "batch.results.stored": "every result row stored, chunk not marked collected",
    "batch.collected": "chunk marked collected, retryable rows not resubmitted",
    "batch.resubmit.before": "about to resubmit a chunk's retryable rows",
    "batch.resubmit.recorded": "resubmitted batch created and recorded",
    "batch.cancel.recorded": "timeout cancel recorded in the ledger, not sent",
    "batch.canceled": "timeout cancel sent",
    "realtime.sending": "a realtime request about to be sent",
    "realtime.answered": "a realtime answer received (billed), not recorded",
    "realtime.recorded": "a realtime result recorded",
    "usage.logged": "billed rows in the usage log, not yet in the ledger",
    "leftovers.before": "batch lane done, leftovers about to go realtime",
    "output.before": "every task finished, output not written",
    "output.partial": "output temp file partly written",
    "output.before_rename": "output temp file complete, not renamed",
    "output.renamed": "output in place, run not marked complete",
    "run.complete": "run marked complete",
    "flow.artifacts.published": "the flow's artifacts published, its final state not reported",
}


def _armed(spec: str) -> dict[str, int]:
    name, _, hit = spec.strip().partition(":")
    if not name:
        return {}
    return {name: int(hit) if hit.isdigit() and int(hit) > 0 else 1}


_ARMED = _armed(os.environ.get(ENV_VAR, ""))
_HITS: dict[str, int] = {}


def arm(spec: str) -> None:
    """Arm `spec` (`name` or `name:N`; "" disarms) in this process, as `BATCH_ENGINE_CRASH_AT` does at import.

    For a test harness that forks workers from a process which imported the engine before the point was known.
    """
    _ARMED.clear()
    _ARMED.update(_armed(spec))
    _HITS.clear()


def crash_point(name: str) -> None:
    """SIGKILL this process if `BATCH_ENGINE_CRASH_AT` names this point (on its N-th hit for `name:N`)."""
    target = _ARMED.get(name)
    if target is None:
        return
    hits = _HITS[name] = _HITS.get(name, 0) + 1
    if hits >= target:
        os.kill(os.getpid(), signal.SIGKILL)

"""`python -m batch_engine.bench emulator-cpu`: the emulator's CPU per batch row and per Messages request.

The `million` benchmark's tasks (~5 KB system prompts; 90 % batch, 10 % realtime) are planned by the engine into
their Messages params; then, in this process and without an HTTP server: the batch rows go through a create body
split as it arrives, are answered row by row as the emulator's processing loop does, and the realtime requests go
one by one through the emulator's ASGI app. It prints the CPU of each part per row or request (the least of
`--rounds`), and a digest of every answer with its ids masked: two versions of the emulator that answer alike
print the same digest. uvicorn's own share of a Messages call is not in it (see `bench.emulator`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batch_engine.bench.million import write_config, write_tasks
from batch_engine.config import load_config
from batch_engine.emulator.app import EmulatorApp
from batch_engine.emulator.rows import StreamedRows
from batch_engine.emulator.settings import EmulatorSettings
from batch_engine.emulator.state import EmulatorState
from batch_engine.files import iter_records
from batch_engine.planning import make_plan, with_user_text

_IDS = re.compile(rb"(msg|req|toolu|srvtoolu|msgbatch)_[0-9a-f]{24}")
_BODY_CHUNK = 65536  # how a create body arrives from uvicorn, roughly
_HEADERS = [
    (b"host", b"emulator"),
    (b"x-api-key", b"bench"),
    (b"anthropic-version", b"2026-10-21"),
    (b"content-type", b"application/json"),
]


def _params(tasks: int) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """(custom_id, params) of the batch tasks and the params of the realtime ones, as the engine plans them."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_tasks(work / "tasks.jsonl", tasks)
        write_config(work / "config.toml")
        plan = make_plan(iter_records(work / "tasks.jsonl"), load_config(work / "config.toml"), datetime.now(UTC))
    batch = [(task.task_id, with_user_text(task.frame, task.user_text)) for task in plan.tasks if task.route == "batch"]
    realtime = [with_user_text(task.frame, task.user_text) for task in plan.tasks if task.route == "realtime"]
    return batch, realtime


def _batch_round(state: EmulatorState, body: bytes, rows: int) -> tuple[float, float, list[bytes]]:
    started = time.process_time()
    streamed = StreamedRows()
    for start in range(0, len(body), _BODY_CHUNK):
        streamed.feed(body[start : start + _BODY_CHUNK])
    streamed.finish()
    if streamed.whole:
        raise AssertionError("the create body was not split into rows as it arrived")
    batch = state.create_batch(streamed.custom_ids, streamed.rows)
    streamed.close()
    created = time.process_time()
    state.clock.advance(state.settings.batch_duration_s)
    answered = state.process_batches(rows)
    done = time.process_time()
    if answered != rows or batch.status != "ended":
        raise AssertionError(f"{answered} of {rows} rows answered, batch {batch.status}")
    return created - started, done - created, sorted(_IDS.sub(b"id", line) for line in batch.results())


async def _realtime_round(app: EmulatorApp, bodies: list[bytes]) -> tuple[float, list[bytes]]:
    answers: list[bytes] = []
    started = time.process_time()
    for body in bodies:
        sent: list[Any] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive(messages: list[dict[str, Any]] = messages) -> dict[str, Any]:
            return messages.pop()

        async def send(message: MutableMapping[str, Any], sent: list[Any] = sent) -> None:
            sent.append(message)

        headers = [*_HEADERS, (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "method": "POST", "path": "/v1/messages", "query_string": b"", "headers": headers}
        await app(scope, receive, send)
        answers.append(b"%d " % sent[0]["status"] + b"".join(message.get("body", b"") for message in sent[1:]))
    elapsed = time.process_time() - started
    return elapsed, [_IDS.sub(b"id", answer) for answer in answers]


def bench_emulator_cpu(tasks: int, rounds: int) -> dict[str, Any]:
    batch, realtime = _params(tasks)
    body = orjson.dumps({"requests": [{"custom_id": custom_id, "params": params} for custom_id, params in batch]})
    bodies = [orjson.dumps(params) for params in realtime]
    creates, answers, requests = [], [], []
    digest = ""
    for _ in range(rounds):
        # A fresh emulator each round, the million benchmark's settings: every round answers the same.
        state = EmulatorState(EmulatorSettings(reply_tokens=32, batch_duration_s=20))
        create_s, answer_s, lines = _batch_round(state, body, len(batch))
        realtime_s, replies = asyncio.run(_realtime_round(EmulatorApp(state), bodies))
        creates.append(create_s)
        answers.append(answer_s)
        requests.append(realtime_s)
        billed = {key: state.stats_json()[key] for key in ("tokens_billed_by_lane", "cost_usd")}
        digest = hashlib.sha256(b"\n".join([*lines, *replies, orjson.dumps(billed)])).hexdigest()[:16]
    return {
        "bench": "emulator-cpu",
        "batch_rows": len(batch),
        "realtime_requests": len(realtime),
        "rounds": rounds,
        "create_us_per_row": round(min(creates) / len(batch) * 1e6, 1),
        "answer_us_per_row": round(min(answers) / len(batch) * 1e6, 1),
        "us_per_realtime_request": round(min(requests) / max(1, len(realtime)) * 1e6, 1),
        "answers_digest": digest,
    }

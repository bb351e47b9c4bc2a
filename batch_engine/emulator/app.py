"""The emulator as a plain ASGI app: routing, auth, body limits, faults, rate limits and wire responses.

Plain ASGI rather than a framework because a dropped connection has to be a real half-sent response, bodies
must be capped while they stream in, and the hot path (one Messages call) should cost as little as possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson
from pydantic import ValidationError

from batch_engine.emulator.catalog import OLDEST_VERSION
from batch_engine.emulator.faults import AFTER_COMMIT_ENDPOINTS, AFTER_COMMIT_KINDS, FAULT_KINDS, failure_for
from batch_engine.emulator.ratelimit import Refusal
from batch_engine.emulator.replies import error_event, sse_events
from batch_engine.emulator.rows import PackedRows, StreamedRows, check_item
from batch_engine.emulator.settings import ENDPOINTS
from batch_engine.emulator.state import EmulatorState, write_state
from batch_engine.emulator.wire import ApiFailure, error_body, invalid, new_id, rfc3339

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger(__name__)
SMALL_BODY = 1_000_000
RESULTS_CHUNK_LINES = 2000
# Batch rows answered per event-loop turn, between turns that serve requests. The real API's batch work never slows
# its Messages endpoint; here both share one loop, and 500 rows (~100 ms on a 2-core machine) per turn held every
# realtime request in flight for that long: a busy engine's realtime lane ran at ~250 requests/s while batches were
# being worked. 50 rows are ~10 ms.
PROCESS_SLICE_ROWS = 50
POLL_ACTIVE_S = 0.01
SAVE_EVERY_S = 0.5


class DroppedConnection(Exception):
    """Raised on purpose after a partial response so the server closes the connection mid-body."""


@dataclass
class Incoming:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes | bytearray = b""
    rows: StreamedRows | None = None  # a batch create's body, taken in row by row as it arrived

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise invalid(f"Request body is not valid JSON: {exc}") from None

    @property
    def api_version(self) -> str:
        """The `anthropic-version` the request asked for; the oldest version when it sent none (assumed)."""
        return self.headers.get("anthropic-version") or OLDEST_VERSION

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('host', 'localhost')}"


@dataclass
class Outgoing:
    status: int
    chunks: list[bytes]
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # send about half of the body, then cut the connection

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Outgoing:
        return cls(status, [orjson.dumps(data)], headers=headers or {})


Handler = Callable[[Incoming, str], Awaitable[Outgoing]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    endpoint: str  # stats key, e.g. "GET /v1/messages/batches/{id}"
    handler: Handler
    body: str  # which size limit applies: "message", "batch" or "small"
    api: bool  # needs an API key


class EmulatorApp:
    """ASGI callable serving the Anthropic API subset plus `/_emulator/*` introspection."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._saving: asyncio.Future[None] | None = None
        batch_path = r"/v1/messages/batches/(?P<id>[^/]+)"
        self._routes = [
            self._route("POST", r"/v1/messages", "messages", self._messages, "message"),
            self._route("POST", r"/v1/messages/count_tokens", "count_tokens", self._count_tokens, "message"),
            self._route("POST", r"/v1/messages/batches", "batches_create", self._batches_create, "batch"),
            self._route("GET", r"/v1/messages/batches", "batches_list", self._batches_list),
            self._route("GET", batch_path, "batches_retrieve", self._batches_retrieve),
            self._route("DELETE", batch_path, "batches_delete", self._batches_delete),
            self._route("POST", batch_path + "/cancel", "batches_cancel", self._batches_cancel),
            self._route("GET", batch_path + "/results", "batches_results", self._batches_results),
            self._route("GET", r"/v1/models", "models", self._models_list),
            Route(
                "GET",
                re.compile(r"/v1/models/(?P<id>[^/]+)"),
                "GET /v1/models/{id}",
                self._models_get,
                "small",
                True,
            ),
            self._admin("GET", "stats", self._admin_stats),
            self._admin("POST", "config", self._admin_config),
            self._admin("POST", "reset", self._admin_reset),
            self._admin("POST", "faults", self._admin_faults),
            self._admin("POST", "clock", self._admin_clock),
        ]

    @staticmethod
    def _route(method: str, path: str, name: str, handler: Handler, body: str = "small") -> Route:
        return Route(method, re.compile(path), ENDPOINTS[name], handler, body, True)

    @staticmethod
    def _admin(method: str, name: str, handler: Handler) -> Route:
        return Route(method, re.compile(f"/_emulator/{name}"), f"{method} /_emulator/{name}", handler, "small", False)

    # --- ASGI plumbing --------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request_id = new_id("req_")
        route, path_id = self._match(scope["method"], scope["path"])
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        incoming = Incoming(scope["method"], scope["path"], _query(scope), headers)
        endpoint = route.endpoint if route else f"{scope['method']} {scope['path']}"
        if route is not None and route.api:
            self.state.stats.record_arrival()
        try:
            if route is not None and route.body == "batch":
                incoming.rows = await self._read_rows(receive, headers, self._body_limit(route))
                body: bytes | bytearray | None = None if incoming.rows is None else b""
            else:
                body = await self._read_body(receive, headers, self._body_limit(route))
            if route is None:
                raise ApiFailure("not_found_error", f"Not found: {scope['method']} {scope['path']}")
            if route.api:
                self._authenticate(headers)
            if body is None:
                raise ApiFailure("request_too_large", "Request exceeds the maximum allowed number of bytes.")
            incoming.body = body
            outgoing = await route.handler(incoming, path_id)
        except ApiFailure as failure:
            outgoing = Outgoing.json(failure.body(request_id), failure.status, _with_should_retry(failure))
        except DroppedConnection:
            raise
        except Exception:
            # A bug here must not look like a network failure to the client: answer as the API would.
            logger.exception("emulator: unexpected error answering %s %s", scope["method"], scope["path"])
            outgoing = Outgoing.json(error_body("api_error", "Internal server error", request_id), 500)
        finally:
            if incoming.rows is not None:
                incoming.rows.close()
        if route is not None and route.endpoint.startswith(("POST /v1/messages/batches", "GET /v1/messages/batches")):
            # Batch endpoints report their own request limit too (polling counts against it).
            outgoing.headers = {**self.state.limiter.batch_headers(), **outgoing.headers}
        self.state.stats.record_call(endpoint, "dropped" if outgoing.drop else str(outgoing.status))
        await self._send(send, outgoing, request_id)

    def _match(self, method: str, path: str) -> tuple[Route | None, str]:
        for route in self._routes:
            if route.method == method:
                found = route.pattern.fullmatch(path)
                if found:
                    return route, found.groupdict().get("id") or ""
        return None, ""

    def _body_limit(self, route: Route | None) -> int:
        settings = self.state.settings
        if route is None or route.body == "small":
            return SMALL_BODY
        return settings.max_message_body_bytes if route.body == "message" else settings.max_batch_body_bytes

    @staticmethod
    async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes | bytearray | None:
        """The body, or None when it is over `limit` (still drained, so the client gets to read the 413)."""
        declared = headers.get("content-length")
        over = declared is not None and declared.isdigit() and int(declared) > limit
        message = await receive()
        if message["type"] == "http.disconnect":
            raise DroppedConnection("client went away")
        first: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            return None if over or len(first) > limit else first
        # Filled in place, sized by content-length when sent: a list of chunks joined at the end would hold a 200 MB
        # batch body twice, and a growing buffer keeps room to spare.
        size = int(declared) if declared is not None and declared.isdigit() and not over else 0
        body = bytearray(max(size, len(first)))
        body[: len(first)] = first
        filled = len(first)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise DroppedConnection("client went away")
            chunk = message.get("body", b"")
            if over or not chunk:
                continue
            if filled + len(chunk) > limit:
                over, body = True, bytearray()
                continue
            if filled + len(chunk) <= len(body):
                body[filled : filled + len(chunk)] = chunk
            else:
                del body[filled:]
                body += chunk
            filled += len(chunk)
        if over:
            return None
        del body[filled:]
        return body

    @staticmethod
    async def _read_rows(receive: Receive, headers: dict[str, str], limit: int) -> StreamedRows | None:
        """A batch create's body, its rows packed as they arrive; None when it is over `limit` (still drained)."""
        declared = headers.get("content-length")
        over = declared is not None and declared.isdigit() and int(declared) > limit
        rows = None if over else StreamedRows()
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if rows is not None:
                    rows.close()
                raise DroppedConnection("client went away")
            chunk = message.get("body", b"")
            if rows is not None:
                size += len(chunk)
                if size > limit:
                    rows.close()
                    rows = None
                else:
                    rows.feed(chunk)
            if not message.get("more_body", False):
                break
        if rows is not None:
            rows.finish()
        return rows

    def _authenticate(self, headers: dict[str, str]) -> None:
        key = headers.get("x-api-key")
        authorization = headers.get("authorization", "")
        if not key and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        expected = self.state.settings.api_key
        if not key or (expected is not None and key != expected):
            raise ApiFailure("authentication_error", "invalid x-api-key")

    async def _send(self, send: Send, outgoing: Outgoing, request_id: str) -> None:
        headers = [
            (b"content-type", outgoing.content_type.encode()),
            (b"request-id", request_id.encode()),
            (b"content-length", str(sum(len(chunk) for chunk in outgoing.chunks)).encode()),
        ]
        headers.extend((key.encode(), value.encode()) for key, value in outgoing.headers.items())
        await send({"type": "http.response.start", "status": outgoing.status, "headers": headers})
        if outgoing.drop:
            body = b"".join(outgoing.chunks)
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            raise DroppedConnection("fault injected by the emulator")
        for chunk in outgoing.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loop = asyncio.get_running_loop()
                self._tasks = [asyncio.create_task(self._process_forever())]
                if self.state.settings.state_file:
                    self._tasks.append(asyncio.create_task(self._save_forever()))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in self._tasks:
                    task.cancel()
                for task in self._tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if self._saving is not None:
                    # An older snapshot still being written must not land after the final one.
                    await asyncio.wait([self._saving])
                if self.state.settings.state_file:
                    write_state(self.state.settings.state_file, self.state.save())
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _process_forever(self) -> None:
        state = self.state
        while True:
            try:
                answered = state.process_batches(PROCESS_SLICE_ROWS)
            except Exception:
                # Keep the loop alive: one broken batch must not stop every other batch from ending.
                logger.exception("emulator: batch processing failed")
                answered = 0
            if answered:
                await asyncio.sleep(0)  # let requests in between slices
                continue
            state.wake.clear()
            timeout = POLL_ACTIVE_S if state.has_active_batches() else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.wake.wait(), timeout)

    async def _save_forever(self) -> None:
        path = self.state.settings.state_file
        assert path is not None
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            if self.state.dirty:
                self._saving = asyncio.ensure_future(asyncio.to_thread(write_state, path, self.state.save()))
                # Shielded: cancelling this loop at shutdown must not abandon a write that is still running.
                await asyncio.shield(self._saving)
                self._saving = None

    # --- shared steps ---------------------------------------------------------------------------------------

    def _fault(self, endpoint: str) -> str | None:
        """Draw a fault: error faults raise here; "drop" and "error_event" are left to the handler."""
        kind = self.state.faults.draw(endpoint, self.state.settings)
        if kind in AFTER_COMMIT_KINDS and endpoint not in AFTER_COMMIT_ENDPOINTS:
            kind = "500"  # nothing to commit first
        if (kind is not None and kind not in ("drop", "error_event", *AFTER_COMMIT_KINDS)) or (
            kind == "error_event" and endpoint != "messages"
        ):
            raise failure_for("529" if kind == "error_event" else kind, self.state.settings.fault_retry_after_s)
        return kind

    def _batch_rpm(self) -> None:
        refusal = self.state.limiter.admit_simple("batches")
        if refusal is not None:
            raise _rate_limited(refusal, self.state.limiter.batch_headers())

    async def _latency(self) -> None:
        settings = self.state.settings
        delay = settings.latency_s + settings.jitter_s * self.state.latency_rng.random()
        if delay > 0:
            await asyncio.sleep(delay)

    # --- Messages -------------------------------------------------------------------------------------------

    async def _messages(self, incoming: Incoming, _: str) -> Outgoing:
        state = self.state
        params = incoming.json()
        model = params.get("model") if isinstance(params, dict) else None
        try:
            fault = self._fault("messages")
            prepared = state.prepare_message(params, api_version=incoming.api_version)
            if fault == "error_event" and not prepared.request.stream:
                raise failure_for("529", 0)  # only a stream can fail after its 200
            refusal = state.limiter.admit_message(prepared.request.model, prepared.rate_limited_input)
            if refusal is not None:
                raise _rate_limited(refusal, {})
        except ApiFailure as failure:
            # Every Messages answer for a known model carries the rate-limit headers, errors included.
            if isinstance(model, str) and model in state.models:
                failure.headers = {**state.limiter.headers(model), **failure.headers}
            raise
        model = prepared.request.model
        await self._latency()
        message, billed = state.answer(prepared, custom_id=None, lane="realtime")
        state.limiter.charge_output(model, billed.output_tokens)
        state.stats.record_realtime_success(incoming.body)
        if fault in ("drop", "error_event", *AFTER_COMMIT_KINDS):
            state.stats.record_unanswered(billed.cost_usd(prepared.request.spec, 1.0))
        if fault in AFTER_COMMIT_KINDS:
            raise state.faults.after_commit_failure(fault)  # answered and billed, yet the client sees an error
        headers = state.limiter.headers(model)
        if not prepared.request.stream:
            return Outgoing(200, [orjson.dumps(message)], headers=headers, drop=fault == "drop")
        events = sse_events(message)
        if fault == "error_event":
            # The API can fail a stream after its 200: the client sees an `error` event, not a status.
            events = [*events[: len(events) // 2], error_event("overloaded_error", "Overloaded")]
        headers["cache-control"] = "no-cache"
        return Outgoing(200, [b"".join(events)], "text/event-stream", headers, drop=fault == "drop")

    async def _count_tokens(self, incoming: Incoming, _: str) -> Outgoing:
        self._fault("count_tokens")
        prepared = self.state.prepare_message(incoming.json(), counting=True, api_version=incoming.api_version)
        refusal = self.state.limiter.admit_simple("count_tokens")
        if refusal is not None:
            raise _rate_limited(refusal, {})
        await self._latency()
        return Outgoing.json({"input_tokens": prepared.request.total_tokens})

    # --- Message Batches ------------------------------------------------------------------------------------

    async def _batches_create(self, incoming: Incoming, _: str) -> Outgoing:
        fault = self._fault("batches_create")
        self._batch_rpm()
        streamed = incoming.rows
        if streamed is not None and not streamed.whole:
            # Every row parsed and passed its checks as it arrived, so the body is valid JSON of the usual shape.
            custom_ids, rows = streamed.custom_ids, streamed.rows
            self._check_count(len(custom_ids))
        else:
            # Another layout, a bad row or invalid JSON: parse the whole body, answering exactly as the API does.
            if streamed is not None:
                incoming.body = streamed.whole_body()
            custom_ids, rows = self._batch_rows(self._requests(incoming))
            incoming.body = b""
        wait = self.state.queue_room(len(custom_ids))
        if wait is not None:
            cap = self.state.settings.batch_queue_cap
            raise _rate_limited(
                Refusal("batch_queue", cap or 0, max(wait, 0.05)),
                {},
                f"Number of batch requests in the processing queue would exceed your limit of {cap:,}.",
            )
        batch = self.state.create_batch(custom_ids, rows, incoming.api_version)
        if fault in AFTER_COMMIT_KINDS:
            raise self.state.faults.after_commit_failure(fault)  # created, yet the client sees an error
        data = batch.to_json(incoming.base_url, self.state.clock.now())
        return Outgoing(200, [orjson.dumps(data)], drop=fault == "drop")

    @staticmethod
    def _requests(incoming: Incoming) -> list[Any]:
        payload = incoming.json()
        if not isinstance(payload, dict):
            raise invalid("Request body must be a JSON object.")
        for key in payload:
            if key != "requests":
                raise invalid(f"{key}: Extra inputs are not permitted")
        requests = payload.get("requests")
        return requests if isinstance(requests, list) else []  # not a list: refused like an empty one

    def _check_count(self, count: int) -> None:
        maximum = self.state.settings.max_batch_requests
        if not 1 <= count <= maximum:
            raise invalid(f"requests: a batch holds between 1 and {maximum:,} requests")

    def _batch_rows(self, requests: list[Any]) -> tuple[list[str], PackedRows]:
        """Check the parsed items of `requests` and pack them."""
        self._check_count(len(requests))
        custom_ids: list[str] = []
        rows = PackedRows()
        seen: set[str] = set()
        for index in range(len(requests)):
            # Each item is dropped once packed, so the parse tree of a large body shrinks as it is read.
            item, requests[index] = requests[index], None
            custom_id, params = check_item(index, item, seen)
            custom_ids.append(custom_id)
            rows.append(params)
        return custom_ids, rows

    async def _batches_retrieve(self, incoming: Incoming, batch_id: str) -> Outgoing:
        fault = self._fault("batches_retrieve")
        self._batch_rpm()
        batch = self.state.batches.get(batch_id)
        self.state.touch(batch)
        return Outgoing(
            200,
            [orjson.dumps(batch.to_json(incoming.base_url, self.state.clock.now()))],
            drop=fault == "drop",
        )

    async def _batches_list(self, incoming: Incoming, _: str) -> Outgoing:
        fault = self._fault("batches_list")
        self._batch_rpm()
        limit = _limit(incoming.query)
        batches, has_more = self.state.batches.page(
            limit, incoming.query.get("after_id"), incoming.query.get("before_id")
        )
        now = self.state.clock.now()
        data = []
        for batch in batches:
            self.state.touch(batch)
            data.append(batch.to_json(incoming.base_url, now))
        page = {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
        return Outgoing(200, [orjson.dumps(page)], drop=fault == "drop")

    async def _batches_cancel(self, incoming: Incoming, batch_id: str) -> Outgoing:
        fault = self._fault("batches_cancel")
        self._batch_rpm()
        batch = self.state.batches.get(batch_id)
        self.state.cancel_batch(batch)
        return Outgoing(
            200,
            [orjson.dumps(batch.to_json(incoming.base_url, self.state.clock.now()))],
            drop=fault == "drop",
        )

    async def _batches_delete(self, incoming: Incoming, batch_id: str) -> Outgoing:
        fault = self._fault("batches_delete")
        self._batch_rpm()
        self.state.delete_batch(batch_id)
        return Outgoing(200, [orjson.dumps({"id": batch_id, "type": "message_batch_deleted"})], drop=fault == "drop")

    async def _batches_results(self, incoming: Incoming, batch_id: str) -> Outgoing:
        fault = self._fault("batches_results")
        self._batch_rpm()
        batch = self.state.batches.get(batch_id)
        self.state.touch(batch)
        if batch.archived(self.state.clock.now()):
            raise ApiFailure("not_found_error", f"Results of Message Batch {batch_id} are no longer available.")
        if batch.status != "ended":
            raise invalid(f"Message Batch {batch_id} has not finished processing; results are not available yet.")
        lines = batch.results()
        chunks = []
        while chunk := b"".join(line + b"\n" for line in itertools.islice(lines, RESULTS_CHUNK_LINES)):
            chunks.append(chunk)
        return Outgoing(200, chunks, "application/x-jsonl", drop=fault == "drop")

    # --- Models ---------------------------------------------------------------------------------------------

    def _model_info(self, model: str) -> dict[str, Any]:
        spec = self.state.models[model]
        return {
            "type": "model",
            "id": model,
            "display_name": model.replace("claude-", "Claude ").replace("-", " ").title(),
            "created_at": rfc3339(datetime.combine(spec.released, datetime.min.time(), tzinfo=UTC).timestamp()),
            "max_input_tokens": spec.context_tokens,
            "max_tokens": spec.max_output_tokens,
            "lifecycle": "active",
        }

    async def _models_list(self, incoming: Incoming, _: str) -> Outgoing:
        self._fault("models")
        limit = _limit(incoming.query)
        ids = list(self.state.models)
        after, before = incoming.query.get("after_id"), incoming.query.get("before_id")
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
        if before in ids:
            ids = ids[: ids.index(before)][-limit:]
        chosen = ids[:limit]
        data = [self._model_info(model) for model in chosen]
        return Outgoing.json(
            {
                "data": data,
                "has_more": len(ids) > limit,
                "first_id": chosen[0] if chosen else None,
                "last_id": chosen[-1] if chosen else None,
            }
        )

    async def _models_get(self, _incoming: Incoming, model: str) -> Outgoing:
        self._fault("models")
        if model not in self.state.models:
            raise ApiFailure("not_found_error", f"model: {model}")
        return Outgoing.json(self._model_info(model))

    # --- /_emulator -----------------------------------------------------------------------------------------

    async def _admin_stats(self, _incoming: Incoming, _: str) -> Outgoing:
        return Outgoing.json(self.state.stats_json())

    async def _admin_config(self, incoming: Incoming, _: str) -> Outgoing:
        changes = incoming.json()
        if not isinstance(changes, dict):
            raise invalid("Send a JSON object of settings to change.")
        try:
            settings = self.state.configure(changes)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise invalid(f"{'.'.join(str(part) for part in first['loc']) or 'settings'}: {first['msg']}") from None
        self.state.wake.set()
        return Outgoing.json(settings.public())

    async def _admin_reset(self, _incoming: Incoming, _: str) -> Outgoing:
        self.state.reset()
        return Outgoing.json({"reset": True})

    async def _admin_faults(self, incoming: Incoming, _: str) -> Outgoing:
        order = incoming.json()
        if not isinstance(order, dict):
            raise invalid('Send {"endpoint": ..., "kind": ..., "count": 1}.')
        try:
            self.state.faults.script(str(order.get("endpoint")), str(order.get("kind")), int(order.get("count", 1)))
        except (TypeError, ValueError) as exc:
            raise invalid(f"{exc} (kinds: {', '.join(FAULT_KINDS)})") from None
        return Outgoing.json({"pending_faults": self.state.faults.pending()})

    async def _admin_clock(self, incoming: Incoming, _: str) -> Outgoing:
        order = incoming.json()
        advance = order.get("advance_s", 0) if isinstance(order, dict) else None
        if not isinstance(advance, int | float) or isinstance(advance, bool) or advance < 0:
            raise invalid('Send {"advance_s": <seconds ≥ 0>}.')
        self.state.clock.advance(float(advance))
        self.state.wake.set()
        return Outgoing.json({"now": rfc3339(self.state.clock.now())})


def _rate_limited(refusal: Refusal, headers: dict[str, str], message: str | None = None) -> ApiFailure:
    wait = refusal.retry_after_s
    return ApiFailure(
        "rate_limit_error",
        message or refusal.message(),
        headers={
            **headers,
            "retry-after": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(math.ceil(wait * 1000)),
        },
    )


def _with_should_retry(failure: ApiFailure) -> dict[str, str]:
    """The error's headers plus `x-should-retry`, which the API may send and the SDK obeys before anything else
    (SDK `_base_client._should_retry`; reference §0.8): true where the SDK would retry anyway, false on the
    other 4xx. A spend-limit 429 carries none (the SDK was seen retrying it, reference §2)."""
    headers = dict(failure.headers)
    if "x-should-retry" in headers or (failure.details or {}).get("error_code", "").endswith("spend_limit_reached"):
        return headers
    status = failure.status
    headers["x-should-retry"] = "true" if status in (408, 409, 429) or status >= 500 else "false"
    return headers


def _query(scope: Scope) -> dict[str, str]:
    if not scope.get("query_string"):
        return {}
    raw = scope["query_string"].decode("latin-1")
    return {key: values[-1] for key, values in parse_qs(raw).items()}


def _limit(query: dict[str, str]) -> int:
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise invalid("limit: Input should be an integer between 1 and 1000")
    return int(raw)

"""The only module that talks to the API, and the only importer of `anthropic`: client construction, error
translation, the retry policy, and thin calls that hand plain data (dicts, dataclasses) to the lanes so nothing
else depends on SDK types.

A run's non-streamed Messages requests go over HTTP directly (`Connection.send_message`), with the headers the SDK
sends: the SDK's import (its ~1,500 pydantic models) is 2-3 s of CPU before a first request could go out, and its
request building and reply parsing ~1 ms of CPU per request, for JSON params in and a JSON reply out that the
engine keeps as JSON. They go on `http11.Http11Pool` (~0.25 ms of CPU a request; `httpx2`, the SDK's HTTP library,
~2 ms), or on `httpx2` for what that pool leaves to it (proxies, redirects). Everything else (streaming, token
counts, batches) goes through the SDK, imported on first use.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import importlib
import inspect
import os
import random
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import httpx2
import orjson
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base

import batch_engine
from batch_engine.errors import ApiError, PermanentApiError, SpendLimitError, TransientApiError
from batch_engine.http11 import Http11Pool, plain_route

if TYPE_CHECKING:
    import anthropic

    AsyncClient: TypeAlias = anthropic.AsyncAnthropic

T = TypeVar("T")
# A generator of our own: jitter must not disturb (or depend on) the global random state.
_JITTER = random.Random()
RETRY_AFTER_JITTER = 0.1  # a retry-after wait is stretched by up to this share

# 429s whose details.error_code says the money ran out: retrying cannot succeed until the limit resets.
SPEND_LIMIT_CODES = frozenset(
    {"enforced_spend_limit_reached", "contract_spend_limit_reached", "linked_organization_spend_limit_reached"}
)
SELF_SET_SPEND_LIMIT = "reached your specified API usage limits"
_RETRYABLE_STATUS = frozenset({408, 409, 429})
# Error types of the API's error statuses, for an SSE `error` event, which arrives after the stream's 200.
_STREAM_ERROR_STATUS = {"rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529}
# The SDK refuses non-streaming calls it expects to take over 10 minutes: 3600 s * max_tokens / 128,000.
MAX_NONSTREAMING_TOKENS = 21_333


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Where and how to reach the API. The key stays a SecretStr so no repr or log can show it."""

    api_key: SecretStr = field(repr=False)
    base_url: str | None = None
    timeout_s: float = 600.0


API_KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"


def api_from_environment() -> ApiSettings | None:
    """`ANTHROPIC_API_KEY` (and `ANTHROPIC_BASE_URL` if set), or None when there is no key."""
    key = os.environ.get(API_KEY_ENV, "")
    if not key:
        return None
    return ApiSettings(SecretStr(key), os.environ.get(BASE_URL_ENV) or None)


def make_client(settings: ApiSettings, *, max_retries: int = 0) -> AsyncClient:
    """One client per run; SDK retries off unless asked (a benchmark): our policy owns them, so attempts never
    multiply."""
    import anthropic

    return anthropic.AsyncAnthropic(
        api_key=settings.api_key.get_secret_value(),
        base_url=settings.base_url,
        timeout=settings.timeout_s,
        max_retries=max_retries,
    )


# --- errors ------------------------------------------------------------------------------------------------


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    seconds = headers.get("retry-after")
    if not seconds:
        return None
    try:
        return max(0.0, float(seconds))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(seconds)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def status_error(
    status: int, headers: Mapping[str, str], body: object, fallback: str, request_id: str | None
) -> ApiError:
    """The error for an API response of `status` (or an SSE `error` event, status < 400) and its decoded body;
    `fallback` is the message when the body has none."""
    error: dict[str, Any] = {}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
    details: dict[str, Any] = error["details"] if isinstance(error.get("details"), dict) else {}
    error_type = str(error.get("type") or "api_error")
    if status < 400:
        # An `error` event in a stream that began with a 200: the status that error would have had.
        status = _STREAM_ERROR_STATUS.get(error_type, status)
    error_code = details.get("error_code")
    message = str(error.get("message") or fallback)
    kwargs: dict[str, Any] = {
        "status": status,
        "error_type": error_type,
        "request_id": request_id,
        "retry_after_s": _retry_after_s(headers),
        "error_code": error_code,
        "headers": headers,
    }
    text = f"{status} {error_type}: {message}"
    if (
        (status == 429 and error_code in SPEND_LIMIT_CODES)
        # A linked organisation's spend limit is a 402 billing_error; one the organisation set for itself is a
        # 400 whose message says so (no error_code documented for it; docs: /api/rate-limits, /api/errors).
        or status == 402
        or (status == 400 and SELF_SET_SPEND_LIMIT in message)
    ):
        return SpendLimitError(text, **kwargs)
    should_retry = headers.get("x-should-retry")
    retryable = status in _RETRYABLE_STATUS or status >= 500
    if should_retry in ("true", "false"):
        retryable = should_retry == "true"
    return (TransientApiError if retryable else PermanentApiError)(text, **kwargs)


def transport_error(exc: Exception) -> TransientApiError:
    """A request that got no response: timed out, or the connection failed or dropped (`httpx2`'s transport
    errors, or the `TimeoutError` and `OSError`s of `http11`)."""
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return TransientApiError("request timed out", error_type="timeout_error")
    return TransientApiError(f"connection error: {exc}", error_type="connection_error")


def _call_errors(*more: type[Exception]) -> tuple[type[Exception], ...]:
    """What an SDK call can raise (and `more`): the SDK's errors, and transport errors it lets through unwrapped
    once a streamed body (SSE events, batch results JSONL) is being read, e.g. a connection dropped halfway
    through. A function, so that naming them does not import the SDK; an `except` clause calls it only when
    something was raised."""
    import anthropic

    return (anthropic.AnthropicError, httpx2.TransportError, *more)


def translate(exc: BaseException) -> ApiError:
    """The one place SDK exceptions become our error tree."""
    import anthropic

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, anthropic.APIStatusError):
        return status_error(exc.status_code, exc.response.headers, exc.body, exc.message, exc.request_id)
    if isinstance(exc, anthropic.APITimeoutError):
        return TransientApiError("request timed out", error_type="timeout_error")
    if isinstance(exc, anthropic.APIConnectionError):
        return TransientApiError(f"connection error: {exc.__cause__ or exc}", error_type="connection_error")
    if isinstance(exc, httpx2.TransportError):
        return transport_error(exc)
    return PermanentApiError(f"{type(exc).__name__}: {exc}", error_type="client_error")


async def _translated(call: Awaitable[T]) -> T:
    try:
        return await call
    except _call_errors(ValueError) as exc:
        raise translate(exc) from exc


# --- the retry policy --------------------------------------------------------------------------------------


async def _real_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, honoring retry-after; bounded in attempts *and* total time.

    Only `TransientApiError` is retried. `sleep` is the testing seam: tests pass a recorder and assert the
    sequence of requested waits instead of wall time.
    """

    attempts: int = 8
    max_time_s: float = 300.0
    initial_wait_s: float = 0.5
    max_wait_s: float = 32.0
    sleep: Callable[[float], Awaitable[None]] = _real_sleep
    on_retry: Callable[[ApiError, float], None] | None = None

    def wait_s(self, attempt: int, error: BaseException | None) -> float:
        """The wait before retry number `attempt` (1-based): the server's retry-after, else jittered backoff."""
        if isinstance(error, ApiError) and error.retry_after_s is not None:
            # Never sooner than the server asked; a little later at random, so requests refused together do not
            # all come back in the same instant.
            jitter = 1.0 + _JITTER.uniform(0, RETRY_AFTER_JITTER)
            return float(min(error.retry_after_s * jitter, self.max_time_s))
        ceiling: float = min(self.max_wait_s, self.initial_wait_s * 2.0 ** (attempt - 1))
        return ceiling / 2 + _JITTER.uniform(0, ceiling / 2)

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if self.on_retry is not None and isinstance(error, ApiError) and state.next_action is not None:
            self.on_retry(error, state.next_action.sleep)

    async def call(self, fn: Callable[[], Awaitable[T]], *, backoff_step: Callable[[int], int] | None = None) -> T:
        """Run `fn` under the policy; the last error is re-raised as it was.

        `backoff_step` maps the retry number to the step of the exponential backoff it waits (default: the same),
        for a caller that knows whether the failures are the API's state or this request's bad luck. The time
        bound holds within one request: no wait starts that would end past `max_time_s` since the first attempt
        (time counted as the waits asked for, or the wall clock if that is more)."""

        started = time.monotonic()
        try:
            # The first attempt outside tenacity: most calls succeed at once, and tenacity's machinery was ~20 %
            # of the realtime lane's CPU per request (measured: py-spy, 20k requests).
            return await fn()
        except TransientApiError as error:
            failures = [error]

        async def again() -> T:
            # Tenacity's first attempt is the one that just failed, replayed (not sent again): its attempt
            # numbers, waits and stop conditions are the policy's as if it had run every attempt.
            if failures:
                raise failures.pop()
            return await fn()

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            attempt = state.attempt_number
            return self.wait_s(attempt if backoff_step is None else backoff_step(attempt), error)

        waited = [0.0]

        def out_of_time(state: RetryCallState) -> bool:
            elapsed = max(time.monotonic() - started, waited[0])
            return elapsed + (state.upcoming_sleep or 0.0) > self.max_time_s

        async def sleep(seconds: float) -> None:
            waited[0] += seconds
            await self.sleep(seconds)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts) | _StopWhen(out_of_time),
            wait=wait,
            retry=retry_if_exception_type(TransientApiError),
            sleep=sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await again()
        raise AssertionError("unreachable: tenacity either returns or re-raises")


class _StopWhen(stop_base):
    """A tenacity stop condition from a predicate on the retry state."""

    def __init__(self, predicate: Callable[[RetryCallState], bool]) -> None:
        self._predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._predicate(retry_state)


# --- messages ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A finished Messages call: the message as JSON-ready data and the response headers."""

    message: dict[str, Any]
    headers: Mapping[str, str]
    request_id: str | None


_SDK_ONLY_PARAMETERS = frozenset({"self", "extra_headers", "extra_query", "extra_body", "timeout"})


@functools.cache
def _fields(method: str) -> frozenset[str]:
    """The API fields of `AsyncMessages.<method>` (its keyword parameters but the SDK's own)."""
    from anthropic.resources.messages import AsyncMessages

    return frozenset(inspect.signature(getattr(AsyncMessages, method)).parameters) - _SDK_ONLY_PARAMETERS


def _keywords(params: dict[str, Any], method: str) -> dict[str, Any]:
    """`params` as keywords of the typed SDK method `AsyncMessages.<method>`. Fields it does not name go in
    `extra_body`, so the API, not a TypeError, judges them. Sampling params never get here: API version 2026-10-21
    (what SDK 2.x sends) refuses temperature/top_p/top_k on every model, so planning rejects such records up front
    (validate.py)."""
    fields = _fields(method)
    extra = {key: value for key, value in params.items() if key not in fields}
    if not extra:
        return params
    return {key: value for key, value in params.items() if key in fields} | {"extra_body": extra}


# The API version SDK 2.x sends (anthropic/_constants.py ANTHROPIC_API_VERSION): requests sent without the SDK
# send the same (tests/engine/test_connection.py checks that they agree, header by header).
API_VERSION = "2026-10-21"
# The SDK's connection pool (anthropic/_constants.py DEFAULT_CONNECTION_LIMITS).
_POOL = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)


def preload_sdk() -> None:
    """Start importing `anthropic` in a background thread (once), for a run that will need it: its batch lane.

    Called while the plan is being made, at its first batch task, so the import (2-3 s of CPU, many times that in
    wall time when it competes for the GIL with a busy realtime lane) overlaps planning instead of holding up the
    first create. `Connection.load_sdk` then finds it imported, or waits on the import lock for the rest."""
    global _preloading
    if _preloading is None and "anthropic" not in sys.modules:
        _preloading = threading.Thread(target=importlib.import_module, args=("anthropic",), daemon=True)
        _preloading.start()


_preloading: threading.Thread | None = None


class Connection:
    """One run's way to the API: Messages requests over HTTP directly, and the SDK client for everything else.

    `send_message` posts a non-streamed request itself, with the SDK's headers (Bearer key, API version, JSON),
    and reads the reply as the API sent it; its errors are the ones `translate` makes of the SDK's. `sdk` is the
    SDK client, made on first use; `load_sdk` makes it with `anthropic` imported in a worker thread, so requests
    already going out keep going while it loads.
    """

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self._base_url = settings.base_url or os.environ.get(BASE_URL_ENV) or "https://api.anthropic.com"
        self._headers = {
            "Authorization": f"Bearer {settings.api_key.get_secret_value()}",
            "anthropic-version": API_VERSION,
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": f"batch-engine/{batch_engine.__version__}",
        }
        route = plain_route(self._base_url)
        self._lean = None if route is None else Http11Pool(route, self._headers, settings.timeout_s)
        self._http: httpx2.AsyncClient | None = None
        self._sdk: AsyncClient | None = None

    @property
    def sdk(self) -> AsyncClient:
        if self._sdk is None:
            self._sdk = make_client(self.settings)
        return self._sdk

    async def load_sdk(self) -> AsyncClient:
        if self._sdk is None:
            await asyncio.to_thread(importlib.import_module, "anthropic")
        return self.sdk

    def _client(self) -> httpx2.AsyncClient:
        if self._http is None:
            self._http = httpx2.AsyncClient(
                base_url=self._base_url,
                timeout=self.settings.timeout_s,
                limits=_POOL,
                follow_redirects=True,  # as the SDK's client
                headers=self._headers,
            )
        return self._http

    async def send_message(self, params: dict[str, Any], *, stream: bool) -> Reply:
        """One Messages request (streamed, through the SDK, when asked or when max_tokens needs it); errors are
        translated."""
        if stream or int(params.get("max_tokens", 0)) > MAX_NONSTREAMING_TOKENS:
            return await stream_message(await self.load_sdk(), params)
        body = orjson.dumps(params)
        if self._lean is not None:
            try:
                answer = await self._lean.post("/v1/messages", body)
            except (OSError, TimeoutError) as exc:
                raise transport_error(exc) from exc
            if not 300 <= answer.status < 400:
                return _reply(answer.status, answer.headers, answer.body)
            # A redirect: asked again through httpx2, which follows it as the SDK's client does.
        try:
            response = await self._client().post("/v1/messages", content=body)
        except httpx2.TransportError as exc:
            raise transport_error(exc) from exc
        return _reply(response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        try:
            if self._lean is not None:
                await self._lean.aclose()
            if self._http is not None:
                await self._http.aclose()
        finally:
            if self._sdk is not None:
                await self._sdk.close()


def _reply(status: int, headers: Mapping[str, str], content: bytes) -> Reply:
    """The `Reply` of a Messages answer, or the `ApiError` it is."""
    request_id = headers.get("request-id")
    if not 200 <= status < 300:
        raise _response_error(status, headers, content, request_id)
    try:
        return Reply(orjson.loads(content), headers, request_id)
    except ValueError as exc:
        raise translate(exc) from exc


def _response_error(status: int, headers: Mapping[str, str], content: bytes, request_id: str | None) -> ApiError:
    """`status_error` of an error response, its body decoded (and its fallback message worded) as the SDK does."""
    text = content.decode("utf-8", errors="replace").strip()
    body: object = text
    try:
        body = orjson.loads(text)
        fallback = f"Error code: {status} - {body}"
    except ValueError:
        fallback = text or f"Error code: {status}"
    return status_error(status, headers, body, fallback, request_id)


async def stream_message(client: AsyncClient, params: dict[str, Any]) -> Reply:
    """One streamed Messages request through the SDK, kept as the message it adds up to; errors are translated."""
    try:
        async with client.messages.stream(**_keywords(params, "stream")) as events:
            message = await events.get_final_message()
            # exclude_unset: the fields the API sent, as a non-streamed reply or a batch row has them.
            reply = message.model_dump(mode="json", exclude_unset=True)
            return Reply(reply, events.response.headers, events.request_id)
    except _call_errors(ValueError) as exc:
        raise translate(exc) from exc


async def count_tokens(client: AsyncClient, params: dict[str, Any]) -> int:
    """Exact input tokens of a request, from `messages.count_tokens` (max_tokens is not part of it)."""
    body = {key: value for key, value in params.items() if key != "max_tokens"}
    counted = await _translated(client.messages.count_tokens(**_keywords(body, "count_tokens")))
    return int(counted.input_tokens)


# --- message batches ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What the engine needs of a MessageBatch."""

    id: str
    status: str  # in_progress | canceling | ended
    request_counts: dict[str, int]
    created_at: float
    ended_at: float | None
    archived: bool

    @property
    def total(self) -> int:
        return sum(self.request_counts.values())


def _timestamp(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _batch_info(batch: Any) -> BatchInfo:
    counts = batch.request_counts
    return BatchInfo(
        id=batch.id,
        status=batch.processing_status,
        request_counts={
            "processing": counts.processing,
            "succeeded": counts.succeeded,
            "errored": counts.errored,
            "canceled": counts.canceled,
            "expired": counts.expired,
        },
        created_at=batch.created_at.timestamp(),
        ended_at=_timestamp(batch.ended_at),
        archived=batch.archived_at is not None,
    )


class BatchBody:
    """The JSON body of `batches.create` from its encoded rows (`{"custom_id":...,"params":...}` each), joined
    1,000 rows at a time.

    A batch of up to 100,000 rows (256 MB) is never held whole: its length is measured first and the body streamed
    after, under that Content-Length. `rows` must give the same rows on every call; `sizes`, when given, their
    lengths without building them (else the length is measured by a pass over the rows).
    """

    BLOCK_ROWS = 1000

    def __init__(self, rows: Callable[[], Iterable[bytes]], sizes: Callable[[], Iterable[int]] | None = None) -> None:
        self._rows = rows
        self._sizes = sizes
        self._length: int | None = None

    @classmethod
    def from_params(cls, rows: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> BatchBody:
        """The body of (custom_id, params) pairs."""
        return cls(lambda: (orjson.dumps({"custom_id": cid, "params": params}) for cid, params in rows()))

    def blocks(self) -> Iterator[bytes]:
        yield b'{"requests":['
        rows = iter(self._rows())
        first = True
        while block := list(islice(rows, self.BLOCK_ROWS)):
            if not first:
                yield b","
            first = False
            yield b",".join(block)
        yield b"]}"

    def __len__(self) -> int:
        if self._length is None and self._sizes is not None:
            count = total = 0
            for size in self._sizes():
                count += 1
                total += size
            # '{"requests":[' rows joined by commas ']}'
            self._length = len(b'{"requests":[') + total + max(0, count - 1) + len(b"]}")
        if self._length is None:
            self._length = sum(len(block) for block in self.blocks())
        return self._length

    async def stream(self) -> AsyncIterator[bytes]:
        for block in self.blocks():
            yield block


async def create_batch(client: AsyncClient, body: BatchBody) -> BatchInfo:
    """`batches.create` (the SDK's own path and model, the body streamed), exactly one HTTP attempt: a retry here
    could create a second batch."""
    from anthropic.types.messages import MessageBatch

    headers = {"Content-Length": str(len(body))}
    created = client.post(
        "/v1/messages/batches", cast_to=MessageBatch, content=body.stream(), options={"headers": headers}
    )
    return _batch_info(await _translated(created))


async def retrieve_batch(client: AsyncClient, batch_id: str) -> BatchInfo:
    return _batch_info(await _translated(client.messages.batches.retrieve(batch_id)))


async def cancel_batch(client: AsyncClient, batch_id: str) -> BatchInfo:
    return _batch_info(await _translated(client.messages.batches.cancel(batch_id)))


async def list_batches(client: AsyncClient, created_after: float, limit: int | None = None) -> list[BatchInfo]:
    """Batches created at or after `created_after` (epoch seconds), newest first as the API lists them; at most
    `limit` of them."""
    found: list[BatchInfo] = []
    try:
        async for batch in client.messages.batches.list(limit=100 if limit is None else min(limit, 100)):
            info = _batch_info(batch)
            if info.created_at < created_after or (limit is not None and len(found) >= limit):
                break
            found.append(info)
    except _call_errors() as exc:
        raise translate(exc) from exc
    return found


async def delete_batch(client: AsyncClient, batch_id: str) -> None:
    """`batches.delete`: only an ended batch can be deleted; its results go with it."""
    await _translated(client.messages.batches.delete(batch_id))


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One line of a batch's results: its custom_id, outcome type, and the message or the error."""

    custom_id: str
    type: str  # succeeded | errored | canceled | expired
    message: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None
    request_id: str | None = None


def _batch_row(item: dict[str, Any]) -> BatchRow:
    result = item.get("result") or {}
    custom_id = str(item.get("custom_id"))
    if result.get("type") == "succeeded":
        return BatchRow(custom_id, "succeeded", message=result.get("message"))
    if result.get("type") == "errored":
        response = result.get("error") or {}
        inner = response.get("error") or {}
        return BatchRow(
            custom_id,
            "errored",
            error_type=str(inner.get("type", "api_error")),
            error_message=str(inner.get("message", "")),
            request_id=response.get("request_id"),
        )
    return BatchRow(custom_id, str(result.get("type")))


async def batch_results(client: AsyncClient, batch_id: str) -> AsyncGenerator[BatchRow, None]:
    """Stream an ended batch's results row by row (in no particular order: match on custom_id)."""
    try:
        decoder = await client.messages.batches.results(batch_id)
        try:
            # Lines decoded as the API sent them (like realtime replies), not through the SDK's models.
            pending = b""
            async for chunk in decoder.http_response.aiter_bytes():
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        yield _batch_row(orjson.loads(line))
            if pending.strip():
                yield _batch_row(orjson.loads(pending))
        finally:
            await decoder.close()
    except _call_errors(ValueError) as exc:
        raise translate(exc) from exc

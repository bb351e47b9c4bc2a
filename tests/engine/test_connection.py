"""A run's Messages requests go over HTTP without the SDK (`Connection.send_message`): they must be the requests the
SDK sends, and their answers must become the errors `translate` makes of the SDK's, field for field.

Both clients talk to one scripted HTTP server here (not the emulator): it records each request as it arrived and
answers with exactly the status, headers and body a case gives, including ones the emulator never sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings, Connection, Reply, make_client, status_error, translate
from batch_engine.errors import ApiError, PermanentApiError, SpendLimitError, TransientApiError
from tests.support.wire import MESSAGE, read_request

PARAMS: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 64,
    "system": [{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "héllo"}],
    "metadata": {"user_id": "u-1"},
    "some_future_field": {"nested": [1, 2]},  # not in the SDK's signature: it goes as extra_body, as is
}


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = orjson.dumps(MESSAGE)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@asynccontextmanager
async def scripted_server(answer: Answer) -> AsyncIterator[tuple[str, list[Seen]]]:
    """An HTTP/1.1 server answering every request with `answer`; yields its base URL and the requests it saw."""
    seen: list[Seen] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_request(reader)
                method, path, _ = request.line.split(" ", 2)
                seen.append(Seen(method, path, request.headers, request.body))
                reply = [f"HTTP/1.1 {answer.status} X", f"content-length: {len(answer.body)}"]
                reply += [f"{name}: {value}" for name, value in answer.headers.items()]
                writer.write(("\r\n".join(reply) + "\r\n\r\n").encode("latin-1") + answer.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


async def _direct(base_url: str, params: dict[str, Any] = PARAMS) -> Reply:
    connection = Connection(ApiSettings(SecretStr("sk-secret"), base_url, timeout_s=5.0))
    try:
        return await connection.send_message(params, stream=False)
    finally:
        await connection.aclose()


async def _through_the_sdk(base_url: str, params: dict[str, Any] = PARAMS) -> Any:
    """The SDK's own non-streamed call, with the same settings."""
    client = make_client(ApiSettings(SecretStr("sk-secret"), base_url, timeout_s=5.0))
    try:
        known = {"model", "max_tokens", "system", "messages", "metadata"}
        keywords = {key: value for key, value in params.items() if key in known}
        extra = {key: value for key, value in params.items() if key not in known}
        return await client.messages.create(**keywords, extra_body=extra)
    finally:
        await client.close()


def test_a_request_sent_directly_is_the_request_the_sdk_sends() -> None:
    async def both() -> tuple[Reply, Any, list[Seen]]:
        async with scripted_server(Answer(headers={"request-id": "req_1"})) as (base_url, seen):
            direct = await _direct(base_url)
            sdk = await _through_the_sdk(base_url)
            return direct, sdk, seen

    direct, sdk, (sent, by_sdk) = asyncio.run(both())

    assert (sent.method, sent.path) == (by_sdk.method, by_sdk.path) == ("POST", "/v1/messages")
    assert orjson.loads(sent.body) == orjson.loads(by_sdk.body) == PARAMS
    # What the API reads: the key, the API version (the SDK's, which refuses sampling params), the body's type.
    for name in ("authorization", "anthropic-version", "content-type", "accept"):
        assert sent.headers.get(name) == by_sdk.headers.get(name), name
    assert sent.headers["authorization"] == "Bearer sk-secret"
    assert direct.message == MESSAGE == sdk.model_dump(mode="json", exclude_unset=True)
    assert direct.request_id == "req_1" and direct.headers["request-id"] == "req_1"


def test_a_base_url_with_a_path_keeps_it_as_the_sdk_does() -> None:
    async def both() -> list[Seen]:
        async with scripted_server(Answer()) as (base_url, seen):
            await _direct(base_url + "/proxy/anthropic/")
            await _through_the_sdk(base_url + "/proxy/anthropic/")
            return seen

    direct, by_sdk = asyncio.run(both())

    assert direct.path == by_sdk.path == "/proxy/anthropic/v1/messages"


_ERROR_CASES: dict[str, Answer] = {
    "429 rate limit, retry-after": Answer(
        429,
        {"retry-after": "7", "request-id": "req_429", "anthropic-ratelimit-requests-remaining": "0"},
        orjson.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "Number of requests"}}),
    ),
    "429 retry-after-ms": Answer(
        429, {"retry-after-ms": "1500", "retry-after": "2"}, b'{"error":{"type":"rate_limit_error","message":"m"}}'
    ),
    "429 spend limit": Answer(
        429,
        {},
        orjson.dumps(
            {
                "type": "error",
                "error": {
                    "type": "rate_limit_error",
                    "message": "spend",
                    "details": {"error_code": "enforced_spend_limit_reached"},
                },
            }
        ),
    ),
    "402 billing": Answer(402, {}, b'{"type":"error","error":{"type":"billing_error","message":"pay"}}'),
    "400 self-set spend limit": Answer(
        400,
        {},
        orjson.dumps(
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "You have reached your specified API usage limits.",
                },
            }
        ),
    ),
    "400 invalid request": Answer(400, {}, b'{"type":"error","error":{"type":"invalid_request_error","message":"x"}}'),
    "401, x-should-retry true": Answer(
        401, {"x-should-retry": "true"}, b'{"type":"error","error":{"type":"authentication_error","message":"k"}}'
    ),
    "500, x-should-retry false": Answer(500, {"x-should-retry": "false"}, b'{"error":{"type":"api_error"}}'),
    "529 overloaded": Answer(529, {}, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'),
    "502 from a proxy, not JSON": Answer(502, {"content-type": "text/html"}, b"<html>Bad Gateway</html>"),
    "413, empty body": Answer(413, {}, b""),
    "404, JSON without an error": Answer(404, {}, b'{"detail":"nope"}'),
}


@pytest.mark.parametrize("case", list(_ERROR_CASES))
def test_an_error_answer_is_the_error_translate_makes_of_the_sdks(case: str) -> None:
    async def both() -> tuple[ApiError, ApiError]:
        async with scripted_server(_ERROR_CASES[case]) as (base_url, _):
            with pytest.raises(ApiError) as direct:
                await _direct(base_url)
            with pytest.raises(Exception) as by_sdk:
                await _through_the_sdk(base_url)
            return direct.value, translate(by_sdk.value)

    direct, expected = asyncio.run(both())

    assert type(direct) is type(expected)
    assert _fields(direct) == _fields(expected)


def _fields(error: ApiError) -> dict[str, Any]:
    return {
        "text": str(error),
        "status": error.status,
        "error_type": error.error_type,
        "request_id": error.request_id,
        "retry_after_s": error.retry_after_s,
        "error_code": error.error_code,
        "headers": {name: value for name, value in error.headers.items() if name not in ("date", "server")},
    }


def test_the_cases_cover_every_class_and_retryability() -> None:
    # Guards the table above: a case list that lost its spend limits or its permanent errors would prove less.
    classes = set()
    for answer in _ERROR_CASES.values():
        body = orjson.loads(answer.body) if answer.body.startswith(b"{") else answer.body
        classes.add(type(status_error(answer.status, answer.headers, body, "fallback", None)))
    assert classes == {SpendLimitError, PermanentApiError, TransientApiError}


@pytest.mark.parametrize(
    ("failure", "error_type"),
    [
        (lambda port: f"http://127.0.0.1:{port}", "connection_error"),  # nothing listens there
        (None, "timeout_error"),  # accepts, never answers
    ],
)
def test_no_answer_is_a_transient_error_as_through_the_sdk(
    failure: Callable[[int], str] | None, error_type: str
) -> None:
    async def both() -> tuple[ApiError, ApiError]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        if failure is not None:
            server.close()
            await server.wait_closed()
        base_url = f"http://127.0.0.1:{port}"
        settings = ApiSettings(SecretStr("sk"), base_url, timeout_s=0.3)
        try:
            connection = Connection(settings)
            with pytest.raises(ApiError) as direct:
                await connection.send_message(PARAMS, stream=False)
            await connection.aclose()
            client = make_client(settings)
            with pytest.raises(Exception) as by_sdk:  # the SDK's own connection or timeout error
                await client.messages.create(model="m", max_tokens=1, messages=[])
            await client.close()
            return direct.value, translate(by_sdk.value)
        finally:
            server.close()

    direct, expected = asyncio.run(both())

    assert type(direct) is type(expected) is TransientApiError
    assert direct.error_type == expected.error_type == error_type

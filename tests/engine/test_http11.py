"""The lean HTTP/1.1 client under `Connection.send_message` (`batch_engine/http11.py`), against raw servers that
answer the ways real servers and proxies do: header names in any case, repeated headers, chunked and gzip
bodies, bodies that end with the connection, keep-alive and its end, redirects, answers cut off or late.

`test_connection.py` holds it to the SDK's requests and errors; these hold it to HTTP/1.1."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings, Connection, Reply, make_client, translate
from batch_engine.errors import ApiError, TransientApiError
from batch_engine.http11 import plain_route
from tests.support.wire import MESSAGE, read_request

PARAMS: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
BODY = orjson.dumps(MESSAGE)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server calling `handler(reader, writer, connection_number)` per connection; yields its URL and the list
    of connection numbers it accepted."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(len(accepted))
        try:
            await handler(reader, writer, accepted[-1])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted
    finally:
        server.close()


def answering(head: bytes, body: bytes = BODY, *, times: int = 1_000_000, close: bool = False) -> Handler:
    """Answer each request on a connection with `head` + `body`, up to `times` requests; then close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        for _ in range(times):
            await read_request(reader)
            writer.write(head + body)
            await writer.drain()
            if close:
                return

    return handler


def _settings(base_url: str, timeout_s: float = 5.0) -> ApiSettings:
    return ApiSettings(SecretStr("sk"), base_url, timeout_s=timeout_s)


async def _send(connection: Connection) -> Reply:
    return await connection.send_message(PARAMS, stream=False)


def run(handler: Handler, requests: int = 1, timeout_s: float = 5.0) -> tuple[list[Reply | ApiError], list[int]]:
    """Send `requests` requests one after another on one Connection; their replies or errors, and the
    connections the server accepted."""

    async def go() -> tuple[list[Reply | ApiError], list[int]]:
        async with raw_server(handler) as (base_url, accepted):
            connection = Connection(_settings(base_url, timeout_s))
            assert connection._lean is not None  # the lean client, not httpx2, is under test
            outcomes: list[Reply | ApiError] = []
            try:
                for _ in range(requests):
                    try:
                        outcomes.append(await _send(connection))
                    except ApiError as exc:
                        outcomes.append(exc)
            finally:
                await connection.aclose()
            return outcomes, accepted

    return asyncio.run(go())


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_header_names_in_any_case_are_looked_up_lower_case_and_repeats_are_joined() -> None:
    head = _head(
        "HTTP/1.1 429 Too Many Requests",
        f"Content-Length: {len(BODY)}",
        "Retry-After: 7",
        "Request-Id: req_X",
        "Anthropic-RateLimit-Requests-Remaining: 0",
        "X-Thing: a",
        "x-thing: b",
    )
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
    head = head.replace(f"Content-Length: {len(BODY)}".encode(), f"Content-Length: {len(body)}".encode())

    async def through_the_sdk() -> ApiError:
        async with raw_server(answering(head, body)) as (base_url, _):
            client = make_client(_settings(base_url))
            try:
                with pytest.raises(Exception) as raised:
                    await client.messages.create(model="m", max_tokens=1, messages=[])
            finally:
                await client.close()
            return translate(raised.value)

    (direct,), _ = run(answering(head, body))
    expected = asyncio.run(through_the_sdk())

    assert isinstance(direct, TransientApiError)
    assert (direct.retry_after_s, direct.request_id) == (expected.retry_after_s, expected.request_id) == (7.0, "req_X")
    assert direct.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert direct.headers["x-thing"] == expected.headers["x-thing"] == "a, b"


def test_a_chunked_body_is_put_together() -> None:
    parts = (BODY[:10], BODY[10:25], BODY[25:])
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    (reply,), _ = run(answering(_head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"), chunks))

    assert isinstance(reply, Reply) and reply.message == MESSAGE


def test_a_gzip_body_is_decoded() -> None:
    packed = gzip.compress(BODY)
    head = _head("HTTP/1.1 200 OK", "Content-Encoding: gzip", f"Content-Length: {len(packed)}", "request-id: r")
    (reply,), _ = run(answering(head, packed))

    assert isinstance(reply, Reply) and reply.message == MESSAGE and reply.request_id == "r"


def test_a_body_without_a_length_ends_with_the_connection() -> None:
    (reply,), _ = run(answering(_head("HTTP/1.1 200 OK", "Connection: close"), BODY, close=True))

    assert isinstance(reply, Reply) and reply.message == MESSAGE


def test_one_connection_serves_requests_one_after_another() -> None:
    replies, accepted = run(answering(_head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}")), requests=5)

    assert all(isinstance(reply, Reply) for reply in replies)
    assert accepted == [0]


def test_a_connection_the_server_closes_is_not_reused() -> None:
    # "Connection: close" on every answer, then the server closes: each request needs a connection of its own, and
    # none of them fails for it.
    head = _head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}", "Connection: close")
    replies, accepted = run(answering(head, close=True), requests=3)

    assert all(isinstance(reply, Reply) for reply in replies)
    assert accepted == [0, 1, 2]


def test_an_idle_connection_the_server_dropped_is_replaced() -> None:
    async def one_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(_head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}") + BODY)
        await writer.drain()  # then closes, without saying so: a keep-alive timeout on the server's side

    async def go() -> tuple[list[Reply], list[int]]:
        async with raw_server(one_then_drop) as (base_url, accepted):
            connection = Connection(_settings(base_url))
            try:
                first = await _send(connection)
                await asyncio.sleep(0.2)  # the close reaches the client
                second = await _send(connection)
            finally:
                await connection.aclose()
            return [first, second], accepted

    replies, accepted = asyncio.run(go())

    assert [reply.message for reply in replies] == [MESSAGE, MESSAGE]
    assert accepted == [0, 1]


def test_an_answer_cut_off_is_a_connection_error() -> None:
    head = _head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}")
    (error,), _ = run(answering(head, BODY[:20], close=True))

    assert isinstance(error, TransientApiError) and error.error_type == "connection_error"


def test_garbage_for_an_answer_is_a_connection_error() -> None:
    (error,), _ = run(answering(b"SSH-2.0-OpenSSH_9.6\r\n", b"", close=True))

    assert isinstance(error, TransientApiError) and error.error_type == "connection_error"


def test_a_late_answer_is_never_read_as_the_next_requests() -> None:
    # The first answer comes after the client gave up; the second request must get its own answer (on a new
    # connection), never the first's.
    hung_up: list[bool] = []

    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while True:
            await read_request(reader)
            if number == 0:
                # The client that gave up hangs up at once, leaving no connection open to the server.
                hung_up.append(await asyncio.wait_for(reader.read(1), 1.0) == b"")
            late = {**MESSAGE, "id": f"msg_for_connection_{number}"}
            payload = orjson.dumps(late)
            writer.write(_head("HTTP/1.1 200 OK", f"Content-Length: {len(payload)}") + payload)
            await writer.drain()

    (first, second), accepted = run(slow_first, requests=2, timeout_s=0.2)

    assert isinstance(first, TransientApiError) and first.error_type == "timeout_error"
    assert isinstance(second, Reply) and second.message["id"] == "msg_for_connection_1"
    assert accepted == [0, 1]
    assert hung_up == [True]


def test_a_redirect_is_followed_as_the_sdk_follows_it() -> None:
    async def redirecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            request_line = (await read_request(reader)).line
            if " /v1/messages " in request_line:
                moved = ("HTTP/1.1 307 Temporary Redirect", "Location: /moved/v1/messages", "Content-Length: 0")
                writer.write(_head(*moved))
            else:
                assert request_line.startswith("POST /moved/v1/messages ")
                writer.write(_head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}") + BODY)
            await writer.drain()

    (reply,), _ = run(redirecting)

    assert isinstance(reply, Reply) and reply.message == MESSAGE


@pytest.mark.parametrize(
    ("base_url", "environment", "lean"),
    [
        ("https://api.anthropic.com", {}, True),
        ("http://127.0.0.1:8080/prefix", {}, True),
        ("https://api.anthropic.com", {"HTTPS_PROXY": "http://proxy:3128"}, False),
        ("https://api.anthropic.com", {"https_proxy": "http://proxy:3128", "NO_PROXY": "api.anthropic.com"}, True),
        ("http://127.0.0.1:8080", {"HTTPS_PROXY": "http://proxy:3128"}, True),  # a proxy for the other scheme
        ("http://127.0.0.1:8080", {"ALL_PROXY": "http://proxy:3128"}, False),
        ("https://user:pw@api.anthropic.com", {}, False),
        ("https://api.anthropic.com?x=1", {}, False),
    ],
)
def test_what_needs_httpx_goes_through_httpx(
    base_url: str, environment: dict[str, str], lean: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("https_proxy", "http_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert (plain_route(base_url) is not None) is lean
    assert (Connection(_settings(base_url))._lean is not None) is lean


def test_a_connection_used_again_from_another_event_loop_starts_afresh() -> None:
    # A Connection outlives one asyncio.run (a Prefect task per phase runs each in an event loop of its own): the
    # pooled connections of the first loop are not the second's to use.
    import threading

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        box["stop"] = asyncio.Event()
        async with raw_server(answering(_head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}"))) as (url, accepted):
            box["url"], box["accepted"] = url, accepted
            ready.set()
            await box["stop"].wait()

    server = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    server.start()
    ready.wait(5)
    connection = Connection(_settings(box["url"]))
    try:
        first = asyncio.run(_send(connection))
        second = asyncio.run(_send(connection))
    finally:
        asyncio.run(connection.aclose())
        loop.call_soon_threadsafe(box["stop"].set)
        server.join(5)
        loop.close()

    assert first.message == second.message == MESSAGE
    assert box["accepted"] == [0, 1]


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.parametrize("trusted", [True, False])
def test_https_is_verified_with_the_trust_the_sdk_has(
    trusted: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SSL_CERT_FILE is honoured as by httpx2's client (the SDK's): a server it trusts answers; one it does not is
    # a connection error, never a request sent in the clear or unverified.
    cert_path, key_path = _certificate(tmp_path)
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))
    else:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    seen: list[str] = []

    async def go() -> Reply | ApiError:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request_line = (await read_request(reader)).line
                seen.append(request_line)
                writer.write(_head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}") + BODY)
                await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        connection = Connection(_settings(f"https://127.0.0.1:{port}"))
        assert connection._lean is not None
        try:
            return await _send(connection)
        except ApiError as exc:
            return exc
        finally:
            await connection.aclose()
            server.close()

    outcome = asyncio.run(go())

    if trusted:
        assert isinstance(outcome, Reply) and outcome.message == MESSAGE
        assert seen == ["POST /v1/messages HTTP/1.1"]
    else:
        assert isinstance(outcome, TransientApiError) and outcome.error_type == "connection_error"
        assert "CERTIFICATE_VERIFY_FAILED" in str(outcome)
        assert seen == []


def test_an_informational_answer_is_not_the_answer() -> None:
    early = _head("HTTP/1.1 103 Early Hints", "Link: </style.css>; rel=preload")
    (reply,), _ = run(answering(early + _head("HTTP/1.1 200 OK", f"Content-Length: {len(BODY)}", "request-id: r")))

    assert (
        isinstance(reply, Reply)
        and reply.message == MESSAGE
        and reply.headers
        == {
            "content-length": str(len(BODY)),
            "request-id": "r",
        }
    )


def test_the_host_header_names_the_base_urls_host_and_port() -> None:
    from urllib.parse import urlsplit

    from batch_engine.http11 import Http11Pool

    def host(base_url: str) -> bytes:
        head = Http11Pool(urlsplit(base_url), {}, 1.0)._head
        return next(line for line in head.split(b"\r\n") if line.startswith(b"Host: "))

    assert host("http://[::1]:8080") == b"Host: [::1]:8080"
    assert host("https://api.anthropic.com") == b"Host: api.anthropic.com"
    assert host("http://127.0.0.1:9") == b"Host: 127.0.0.1:9"

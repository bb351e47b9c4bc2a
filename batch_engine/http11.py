"""A lean HTTP/1.1 client for the one request a run sends up to a million times: `POST /v1/messages`.

`httpx2` (the SDK's HTTP library) costs ~2 ms of CPU per request on this path (its URL and header models, the
`httpcore2` pool, `anyio` streams, the pure-Python `h11` parser): at a nightly job's 100k realtime requests that
is minutes of a core. This client keeps only what that request needs:

- keep-alive connections, up to `max_connections` at once, idle ones reused newest first (a server that closed
  one is seen on the event loop, `connection_lost`, before it is picked again), at most `max_idle` kept;
- the request written in one go (a fixed head of the base URL's host and the run's headers, the body's length);
- the response parsed by `httptools` (llhttp, in C; the emulator's server uses it too): status, headers (names
  lower-cased, repeated ones joined with ", " as httpx does), a body by content-length, chunked, or up to the
  close; gzip and deflate bodies decoded (it asks for gzip, as httpx does);
- one deadline, `timeout_s`, for the whole exchange (connect, write, read; httpx applies the same value to each
  phase). A request with no complete answer closes its connection: a late answer can never be read as the next
  request's.

What it does not do, `Connection` leaves to `httpx2` (see `plain_route`): proxies from the environment, base URLs
with credentials, a query or another scheme, and redirects (a 3xx is asked again through `httpx2`, which follows
it as the SDK's client does).

Failures are `OSError`s (a refused or dropped connection, a malformed answer: `BrokenAnswer`) and `TimeoutError`;
`Connection` turns both into the `TransientApiError`s the SDK's would become.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
import zlib
from collections import deque
from typing import NamedTuple
from urllib.parse import SplitResult, urlsplit

import httptools

DEFAULT_PORTS = {"http": 80, "https": 443}


class BrokenAnswer(ConnectionError):
    """The server closed the connection or sent something that is not an HTTP/1.1 answer."""


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def plain_route(base_url: str) -> SplitResult | None:
    """The split base URL when this client can reach it itself; None for what needs `httpx2` (a proxy from the
    environment, as httpx's `trust_env` would use; credentials, a query or a fragment in the URL; another
    scheme)."""
    url = urlsplit(base_url)
    if url.scheme not in DEFAULT_PORTS or not url.hostname or url.username or url.query or url.fragment:
        return None
    proxies = urllib.request.getproxies_environment()
    if (url.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(url.hostname):
        return None
    return url


class _Exchange(asyncio.Protocol):
    """One connection: at most one request in flight, its answer assembled from the parser's callbacks."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self.close()  # nothing was asked: whatever this is, the connection cannot be trusted
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BrokenAnswer(f"malformed HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            delimited = "content-length" in self._headers or "transfer-encoding" in self._headers
            if self._headers_done and not delimited and exc is None:
                self.on_message_complete()  # a body that ends where the connection does
            else:
                self._fail(BrokenAnswer("the server closed the connection before a complete answer"))

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An informational answer (103 Early Hints, a 100 Continue): the real one follows on the same request.
            self._headers, self._body, self._headers_done = {}, [], False
            return
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        try:
            answer = Answer(status, self._headers, _decoded(self._headers, self._body))
        except (zlib.error, BrokenAnswer) as exc:
            self.close()
            waiter.set_exception(BrokenAnswer(f"undecodable answer body: {exc}"))
            return
        if not self._parser.should_keep_alive():
            self.close()
        waiter.set_result(answer)

    # --- the pool's side ---

    def send(self, data: bytes, waiter: asyncio.Future[Answer]) -> None:
        assert self.transport is not None
        self._waiter, self._headers, self._body, self._headers_done = waiter, {}, [], False
        self.transport.write(data)

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _decoded(headers: dict[str, str], chunks: list[bytes]) -> bytes:
    body = b"".join(chunks)
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding == "gzip":
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate, as some servers send it
    raise BrokenAnswer(f"content-encoding {encoding!r} was not asked for")


class Http11Pool:
    """POSTs to one origin over keep-alive HTTP/1.1 connections (see the module's docstring)."""

    def __init__(
        self,
        url: SplitResult,
        headers: dict[str, str],
        timeout_s: float,
        max_connections: int = 1000,
        max_idle: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._host = url.hostname or ""
        self._port = url.port or DEFAULT_PORTS[url.scheme]
        self._prefix = url.path.rstrip("/")
        self._tls = url.scheme == "https"
        self._ssl = ssl_context  # made on the first connection when not given
        named = f"[{self._host}]" if ":" in self._host else self._host  # an IPv6 literal keeps its brackets
        host_header = named if url.port is None else f"{named}:{url.port}"
        fixed = {"Host": host_header, **headers, "Accept-Encoding": "gzip"}
        self._head = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode("latin-1")
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Exchange] = deque()
        self._max_idle = max_idle
        self._loop: asyncio.AbstractEventLoop | None = None

    async def post(self, path: str, body: bytes) -> Answer:
        """The answer to one POST of `body` (JSON) to `path` under the base URL's path."""
        request = b"".join(
            (
                f"POST {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1"),
                self._head,
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        if asyncio.get_running_loop() is not self._loop:
            self._bind(asyncio.get_running_loop())
        async with self._slots:
            exchange: _Exchange | None = None
            try:
                async with asyncio.timeout(self._timeout_s):
                    exchange = self._idle_exchange() or await self._connect()
                    waiter = asyncio.get_running_loop().create_future()
                    exchange.send(request, waiter)
                    answer: Answer = await waiter
            except BaseException:
                if exchange is not None:
                    exchange.close()  # half an exchange: its answer, if one comes, belongs to no one
                raise
            if not exchange.closed and len(self._idle) < self._max_idle:
                self._idle.append(exchange)
            elif not exchange.closed:
                exchange.close()
            return answer

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        # Connections and the semaphore belong to one event loop; a pool used from another (a new asyncio.run)
        # starts afresh there.
        for exchange in self._idle:
            exchange.closed = True  # its transport belongs to the old loop, closed with it
        self._idle.clear()
        self._slots = asyncio.Semaphore(self._max_connections)
        self._loop = loop

    def _idle_exchange(self) -> _Exchange | None:
        while self._idle:
            exchange = self._idle.pop()
            if not exchange.closed:
                return exchange
        return None

    async def _connect(self) -> _Exchange:
        loop = asyncio.get_running_loop()
        if self._tls and self._ssl is None:
            self._ssl = _default_ssl()
        _, exchange = await loop.create_connection(
            _Exchange, self._host, self._port, ssl=self._ssl, server_hostname=self._host if self._tls else None
        )
        return exchange

    async def aclose(self) -> None:
        if asyncio.get_running_loop() is not self._loop:
            self._idle.clear()  # another loop's connections, closed with it
        while self._idle:
            self._idle.pop().close()


def _default_ssl() -> ssl.SSLContext:
    # The trust the SDK's client has: httpx2's context (certifi's CAs, SSL_CERT_FILE / SSL_CERT_DIR honoured).
    import httpx2

    return httpx2.create_ssl_context()

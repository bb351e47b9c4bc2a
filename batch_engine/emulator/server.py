"""Run the emulator with uvicorn: in a background thread on a free port (tests, `--emulate`, benchmarks) or
in the foreground (`batch-engine emulator`)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from batch_engine.emulator.app import DroppedConnection, EmulatorApp
from batch_engine.emulator.settings import EmulatorSettings
from batch_engine.emulator.state import EmulatorState
from batch_engine.errors import ConfigError

T = TypeVar("T")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0


class _HideInjectedDrops(logging.Filter):
    """uvicorn logs every exception from the app; an injected dropped connection is not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _HideInjectedDrops) for existing in logger.filters):
        logger.addFilter(_HideInjectedDrops())


# A request body is read up to this much per socket read (asyncio's default is 256 KiB). A batch create's body is
# up to 256 MB, and one read of it was done per event-loop turn, between turns spent answering realtime requests
# (tens of them a turn at a busy engine's concurrency): a create took 15-25 s to arrive while realtime traffic
# was heavy. The real API takes uploads on servers of their own; the emulator should not make a create wait on
# unrelated requests.
READ_BYTES = 4 * 2**20


class _LargeReads(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if hasattr(transport, "max_size"):
            transport.max_size = READ_BYTES  # asyncio's selector transports: the size passed to recv()
        super().connection_made(transport)  # type: ignore[arg-type]


def _uvicorn_config(app: EmulatorApp, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
        # Quiet logging config of our own: uvicorn's default dictConfig would reconfigure the host process.
        log_config=None,
        # httptools (a dependency for this): ~0.4 ms less CPU per request than h11, about a third of what the
        # emulator spends on a Messages call; with larger reads (above).
        http=_LargeReads,
    )


def _listening_socket(host: str, port: int) -> socket.socket:
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
    # without it every response stalls ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"emulator: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


class RunningEmulator:
    """A started emulator: its URL and the introspection calls of `/_emulator/*`, run on its event loop."""

    def __init__(self, settings: EmulatorSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = EmulatorState(settings)
        self.app = EmulatorApp(self.state)
        self._socket = _listening_socket(host, port)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"
        _install_log_filter()
        self._server = uvicorn.Server(_uvicorn_config(self.app, host, self.port, "warning"))
        self._thread = threading.Thread(target=self._run, name=f"emulator:{self.port}", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported to the starting thread
            self._error = exc

    def start(self) -> RunningEmulator:
        """Start serving in a background thread; return once it accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulator did not start on {self.base_url}: {self._error!r}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving, finish in-flight responses, save state if configured, and join the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(STOP_TIMEOUT_S)
        self._socket.close()

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self.app.loop
        if loop is None or not self._thread.is_alive():
            raise RuntimeError("the emulator is not running")
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=30)

    @property
    def settings(self) -> EmulatorSettings:
        return self.state.settings

    def stats(self) -> dict[str, Any]:
        """The same counters as `GET /_emulator/stats`."""
        return self._call(self.state.stats_json)

    def configure(self, **changes: Any) -> EmulatorSettings:
        """Change latency, limits, faults... at run time (like `POST /_emulator/config`)."""

        def apply() -> EmulatorSettings:
            settings = self.state.configure(changes)
            self.state.wake.set()
            return settings

        return self._call(apply)

    def reset(self) -> None:
        """Forget batches, cache, counters and faults; restore the start settings (`/_emulator/reset`)."""
        self._call(self.state.reset)

    def script_fault(self, endpoint: str, kind: str, count: int = 1) -> None:
        """Make the next `count` calls to `endpoint` fail: "429", "529", "500", "drop", "error_event", "spend_limit"."""
        self._call(lambda: self.state.faults.script(endpoint, kind, count))

    def advance_clock(self, seconds: float) -> None:
        """Jump the emulator clock forward (batch expiry, cache TTLs), like `POST /_emulator/clock`."""

        def advance() -> None:
            self.state.clock.advance(seconds)
            self.state.wake.set()

        self._call(advance)

    def __repr__(self) -> str:
        return f"RunningEmulator({self.base_url})"


@contextmanager
def start_emulator(
    settings: EmulatorSettings | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningEmulator]:
    """Serve the emulator in a background thread (free port by default); stop it cleanly on exit."""
    emulator = RunningEmulator(settings or EmulatorSettings(), host, port).start()
    try:
        yield emulator
    finally:
        emulator.stop()


def serve_forever(
    settings: EmulatorSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; `on_ready` gets the base URL once it listens."""
    app = EmulatorApp(EmulatorState(settings))
    sock = _listening_socket(host, port)
    # Listening before uvicorn starts: early clients wait in the backlog instead of being refused, so the
    # URL can be announced right away.
    sock.listen(2048)
    bound_port = sock.getsockname()[1]
    _install_log_filter()
    server = uvicorn.Server(_uvicorn_config(app, host, bound_port, "warning"))
    if on_ready is not None:
        on_ready(f"http://{host}:{bound_port}")
    try:
        server.run(sockets=[sock])  # uvicorn turns SIGINT/SIGTERM into a graceful shutdown
    finally:
        sock.close()

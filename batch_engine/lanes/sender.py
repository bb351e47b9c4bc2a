"""Where the realtime lane's Messages requests go: inline, on the run's own client, or through a sender process
(`batch_engine.sender_process`) that does their HTTP work on another core.

Only the HTTP call moves: the lane keeps its limiter, request slots, retry policy, ledger writes and lease checks,
and gets back the same `Reply`, or the same `ApiError` class with the same fields and headers, either way. If the
process dies, the requests it had in flight fail as dropped connections (the retry policy sends them again) and
every request after that goes inline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

import batch_engine
from batch_engine.client import ApiSettings, Connection, Reply
from batch_engine.errors import TransientApiError
from batch_engine.sender_process import MODULE, Frames, frame, read_frame, rebuilt_error

SenderMode = Literal["auto", "inline", "process"]
# `auto` starts a sender process for a lane of at least this many requests, on a machine with 2+ CPUs. The
# process costs ~0.4 s of CPU to start on a quiet machine (it does not import the SDK), on the other core, and
# moves the HTTP work off this process (~0.3 ms of CPU per request on `http11`'s client, ~2.5 ms on httpx2 for
# what is left to it); requests go inline until it is ready, so a lane never waits for it. Below this, the frames
# to and from it are a large share of what it could move (docs/performance.md).
AUTO_PROCESS_REQUESTS = 2000
# The child runs this very package, wherever it was imported from.
_PACKAGE_ROOT = str(Path(batch_engine.__file__).resolve().parents[1])
# How long a closing process gets to finish (it only has to close its client) before it is killed.
_CLOSE_TIMEOUT_S = 5.0


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Sender:
    """Sends the realtime lane's Messages requests, inline or through a sender process (`mode`)."""

    def __init__(
        self,
        api: Connection,
        mode: SenderMode,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        cpus: int | None = None,
    ) -> None:
        self._api = api
        self._mode = mode
        self._logger = logger
        self._cpus = usable_cpus() if cpus is None else cpus
        self._process: SenderProcess | None = None

    def pays(self, requests: int) -> bool:
        """Whether `requests` about to be sent go through a sender process."""
        if self._mode == "auto":
            return requests >= AUTO_PROCESS_REQUESTS and self._cpus >= 2
        return self._mode == "process"

    async def expect(self, requests: int) -> None:
        """`requests` are about to be sent: start the sender process now if they make it pay (once per run)."""
        if self._process is None and requests and self.pays(requests):
            self._process = await SenderProcess.start(self._api.settings, self._logger)

    async def send(self, params: dict[str, Any], *, stream: bool) -> Reply:
        """One Messages request, as `Connection.send_message` sends it (errors translated)."""
        process = self._process
        # Forced: wait for the process. Automatic: inline until it is ready (it starts in about a second).
        if (
            process is not None
            and process.alive
            and (process.ready or (self._mode == "process" and await process.wait_ready()))
        ):
            return await process.send(params, stream)
        return await self._api.send_message(params, stream=stream)

    async def close(self) -> None:
        if self._process is not None:
            await self._process.close()


class SenderProcess:
    """A running `batch_engine.sender_process` child: requests out on its stdin, answers back on its stdout."""

    def __init__(self, process: asyncio.subprocess.Process, logger: logging.Logger | logging.LoggerAdapter[Any]):
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._frames = Frames(self._stdin.write)
        self._stdout = process.stdout
        self._logger = logger
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[list[Any]]] = {}
        self._ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._closing = False
        self.alive = True
        self.sent = 0
        self.usage: tuple[float, int] | None = None  # the child's CPU seconds and requests answered, at its exit
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, api: ApiSettings, logger: logging.Logger | logging.LoggerAdapter[Any]) -> SenderProcess:
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": _PACKAGE_ROOT + (os.pathsep + path if path else "")}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", MODULE, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
        sender = cls(process, logger)
        # The key goes in the first frame, never on the command line.
        settings = {"api_key": api.api_key.get_secret_value(), "base_url": api.base_url, "timeout_s": api.timeout_s}
        sender._frames(frame(settings))
        logger.info("realtime sender process %d started", process.pid)
        return sender

    @property
    def ready(self) -> bool:
        return self._ready.done() and self._ready.result()

    async def wait_ready(self) -> bool:
        """True once the child is ready; False if it died first."""
        return await asyncio.shield(self._ready)

    async def send(self, params: dict[str, Any], stream: bool) -> Reply:
        request_id = next(self._ids)
        answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        self._frames(frame([request_id, stream, params]))
        self.sent += 1
        try:
            result = await answer
        except asyncio.CancelledError:
            if self.alive:
                self._frames(frame([request_id]))
            raise
        finally:
            del self._pending[request_id]
        kind = result[1]
        if kind == "ok":
            return Reply(result[2], result[3], result[4])
        if kind == "error":
            raise rebuilt_error(result[2])
        raise RuntimeError(f"realtime sender process: {result[2]}")

    async def _read(self) -> None:
        try:
            while True:
                message = await read_frame(self._stdout)
                request_id, kind = message[0], message[1]
                if kind == "ready":
                    self._ready.set_result(True)
                elif kind == "bye":
                    self.usage = (message[2], message[3])
                else:
                    answer = self._pending.get(request_id)
                    if answer is not None and not answer.done():
                        answer.set_result(message)
        except (asyncio.IncompleteReadError, OSError, ValueError, IndexError):
            pass  # the pipe closed (the child exited or was killed) or carried garbage: it is gone either way
        finally:
            await self._gone()

    async def _gone(self) -> None:
        self.alive = False
        if not self._ready.done():
            self._ready.set_result(False)
        in_flight = [answer for answer in self._pending.values() if not answer.done()]
        for answer in in_flight:
            # As inline when a connection drops: transient, so the retry policy sends it again (inline now).
            answer.set_exception(
                TransientApiError("connection error: the realtime sender process exited", error_type="connection_error")
            )
        if self._process.returncode is None and not self._closing:
            self._process.kill()
        code = await self._process.wait()
        if not self._closing:
            self._logger.warning(
                "realtime sender process exited (code %s) with %d requests in flight: they are retried, and "
                "realtime requests are sent from this process from now on",
                code,
                len(in_flight),
            )

    async def close(self) -> None:
        """Close its stdin (it then exits), wait for it, kill it if it does not go."""
        self._closing = True
        try:
            if not self._stdin.is_closing():
                self._frames.flush()
                self._stdin.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), _CLOSE_TIMEOUT_S)
            except TimeoutError:
                self._process.kill()
                await self._reader
        finally:
            if self._process.returncode is None:  # cut short: never leave it behind
                self._process.kill()
        cpu = f", {self.usage[0]:.1f} s CPU" if self.usage is not None else ""
        self._logger.info("realtime sender process: %d requests sent%s", self.sent, cpu)

"""The realtime lane's sender process, `python -m batch_engine.sender_process`, and the frames it speaks.

The HTTP work of a Messages request (~0.3 ms of CPU on `http11`'s client, ~2.5 ms on httpx2, which proxies and
redirects still use) competes with everything else the engine's one busy thread does (planning, batch bodies,
storing results) in a big job. So the engine can hand the HTTP part to this child process, which runs on another
core: it sends each request it is given through `Connection.send_message` (the same method the lane calls inline, so
streaming, the max_tokens rule and error translation are the same) and answers with the reply or the error.
Everything else — rate limits, request slots, the retry policy, the ledger — stays with the lane in the parent.

Frames, both ways: a 4-byte big-endian length, then that many bytes of JSON (orjson).

    parent → child   {"api_key", "base_url", "timeout_s"}     first, once (the key never goes on a command line)
                     [id, stream, params]                     send a Messages request
                     [id]                                     the parent gave up waiting: cancel it
    child → parent   [0, "ready"]                             the client is built; requests are welcome
                     [id, "ok", message, headers, request_id] the reply
                     [id, "error", fields]                    the translated `ApiError`, its headers included
                     [id, "failed", "Type: text"]             anything else a request raised (a bug)
                     [0, "bye", cpu_s, requests]              stdin closed: the child's CPU, then it exits

The child exits when its stdin closes, which is also what happens when the parent dies, so none outlives it.
It logs nothing: prompts and the key never reach a log from here.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import struct
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import orjson
from pydantic import SecretStr

from batch_engine.client import ApiSettings, Connection
from batch_engine.errors import ApiError, PermanentApiError, SpendLimitError, TransientApiError

MODULE = "batch_engine.sender_process"
_LENGTH = struct.Struct(">I")
# Most specific first: a rebuilt error is of the same class as the one the child's translation produced.
_ERROR_CLASSES: dict[str, type[ApiError]] = {
    cls.__name__: cls for cls in (SpendLimitError, PermanentApiError, TransientApiError, ApiError)
}


def frame(value: Any) -> bytes:
    body = orjson.dumps(value)
    return _LENGTH.pack(len(body)) + body


class Frames:
    """Frames written once per event-loop turn: every frame a turn produced goes out in one pipe write, not a
    system call each (at ~1,000 requests a second that was ~6 % of the lane's CPU in the parent)."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._pending: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Write what is pending now (before the pipe is closed)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._write(data)


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's value; `asyncio.IncompleteReadError` at the end of the stream."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return orjson.loads(await reader.readexactly(length))


def error_fields(exc: ApiError) -> dict[str, Any]:
    return {
        "class": next(name for name, cls in _ERROR_CLASSES.items() if isinstance(exc, cls)),
        "message": exc.message,
        "status": exc.status,
        "error_type": exc.error_type,
        "request_id": exc.request_id,
        "retry_after_s": exc.retry_after_s,
        "error_code": exc.error_code,
        "headers": _plain(exc.headers),
    }


def rebuilt_error(fields: dict[str, Any]) -> ApiError:
    """The `ApiError` the child's `error_fields` describe, of the same class, with the same headers."""
    cls = _ERROR_CLASSES[fields["class"]]
    return cls(
        fields["message"],
        status=fields["status"],
        error_type=fields["error_type"],
        request_id=fields["request_id"],
        retry_after_s=fields["retry_after_s"],
        error_code=fields["error_code"],
        headers=fields["headers"],
    )


def _plain(headers: Mapping[str, str]) -> dict[str, str]:
    # httpx's headers iterate with lower-case names, as the lane looks them up.
    return {name.lower(): value for name, value in headers.items()}


# --- the child ---------------------------------------------------------------------------------------------


class _Child:
    def __init__(self, settings: ApiSettings, write: Callable[[bytes], None]) -> None:
        self._api = Connection(settings)
        self._write = write
        self._requests: dict[int, asyncio.Task[None]] = {}
        self.answered = 0

    def start(self, request_id: int, stream: bool, params: dict[str, Any]) -> None:
        task = asyncio.create_task(self._answer(request_id, stream, params))
        self._requests[request_id] = task
        task.add_done_callback(lambda _: self._requests.pop(request_id, None))

    def cancel(self, request_id: int) -> None:
        task = self._requests.get(request_id)
        if task is not None:
            task.cancel()

    async def _answer(self, request_id: int, stream: bool, params: dict[str, Any]) -> None:
        try:
            reply = await self._api.send_message(params, stream=stream)
        except ApiError as exc:
            answer = [request_id, "error", error_fields(exc)]
        except Exception as exc:  # not an API answer: the parent raises it, as the lane would have inline
            answer = [request_id, "failed", f"{type(exc).__name__}: {exc}"]
        else:
            answer = [request_id, "ok", reply.message, _plain(reply.headers), reply.request_id]
        self.answered += 1
        self._write(frame(answer))

    async def close(self) -> None:
        for task in list(self._requests.values()):
            task.cancel()
        await asyncio.gather(*self._requests.values(), return_exceptions=True)
        await self._api.aclose()


class _Output(asyncio.Protocol):
    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    transport, out = await loop.connect_write_pipe(_Output, stdout)
    try:
        first = await read_frame(reader)
    except asyncio.IncompleteReadError:
        return  # the parent went away before saying anything
    settings = ApiSettings(SecretStr(first["api_key"]), first["base_url"], first["timeout_s"])
    frames = Frames(transport.write)
    child = _Child(settings, frames)
    frames(frame([0, "ready"]))
    try:
        while True:
            try:
                request = await read_frame(reader)
            except asyncio.IncompleteReadError:
                break
            if len(request) == 1:
                child.cancel(request[0])
            else:
                child.start(*request)
    finally:
        await child.close()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        frames(frame([0, "bye", usage.ru_utime + usage.ru_stime, child.answered]))
        frames.flush()
        transport.close()
        await out.closed  # once what was written is flushed


def main() -> None:
    # The parent decides when this process stops (it closes stdin); a Ctrl-C in the terminal reaches both.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Frames go out on a private copy of stdout, and fd 1 becomes stderr: nothing printed can corrupt them.
    frames_out = os.dup(1)
    os.dup2(2, 1)
    with open(0, "rb", buffering=0, closefd=False) as stdin, open(frames_out, "wb", buffering=0) as stdout:
        asyncio.run(_serve(stdin, stdout))
    # Everything is said and the client closed: skip the interpreter's teardown (seconds, with the SDK loaded).
    os._exit(0)


if __name__ == "__main__":
    main()

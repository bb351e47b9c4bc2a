"""What the HTTP-level tests of the Messages path share: a Messages reply, and reading one request off a socket."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

# A whole non-streamed Messages reply, as the API sends it.
MESSAGE: dict[str, Any] = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 1},
}


class Request(NamedTuple):
    line: str  # "POST /v1/messages HTTP/1.1"
    headers: dict[str, str]  # names lower-cased
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Request:
    """The next HTTP/1.1 request on a connection (its body by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for header in lines:
        if header:
            name, _, value = header.partition(":")
            headers[name.strip().lower()] = value.strip()
    return Request(line, headers, await reader.readexactly(int(headers.get("content-length", "0"))))

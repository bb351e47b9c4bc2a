"""Wire details shared by the emulator modules: API-shaped errors, ids and RFC 3339 timestamps."""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

# HTTP status of each error type, as the API documents them.
ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class ApiFailure(Exception):
    """An error answer: becomes `{"type":"error","error":{...},"request_id":...}` with its HTTP status."""

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = ERROR_STATUS[error_type]
        self.headers = headers or {}
        self.details = details

    def body(self, request_id: str) -> dict[str, Any]:
        body = error_body(self.error_type, self.message, request_id)
        if self.details is not None:
            body["error"]["details"] = self.details
        return body


def invalid(message: str) -> ApiFailure:
    return ApiFailure("invalid_request_error", message)


def error_body(error_type: str, message: str, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def rfc3339(timestamp: float) -> str:
    """`datetime.fromtimestamp(timestamp, UTC)` as `%Y-%m-%dT%H:%M:%S.%fZ`, rounded as datetime rounds (half to
    even microseconds); every Messages response carries a few, so the date part is formatted once a second."""
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return f"{_utc_second(int(whole))}.{micros:06d}Z"


@functools.lru_cache(maxsize=64)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))

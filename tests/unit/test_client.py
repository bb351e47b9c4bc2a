"""Pure parts of the API client."""

from __future__ import annotations

import anthropic
import httpx2
import orjson
import pytest

from batch_engine.client import BatchBody, translate
from batch_engine.errors import TransientApiError


@pytest.mark.parametrize("rows", [0, 1, 999, 1000, 1001, 2500])
def test_the_batch_body_is_the_requests_document_whatever_the_block_boundaries(rows: int) -> None:
    requests = [(f"c{i}", {"model": "m", "max_tokens": i, "messages": [{"role": "user", "content": "é" * i}]})
                for i in range(rows)]  # fmt: skip

    body = BatchBody.from_params(lambda: iter(requests))

    expected = orjson.dumps({"requests": [{"custom_id": c, "params": p} for c, p in requests]})
    assert b"".join(body.blocks()) == expected
    assert len(body) == len(expected)
    assert b"".join(body.blocks()) == expected  # every pass gives the same bytes
    # The length from the rows' sizes, without building them, is the same.
    rows = [orjson.dumps({"custom_id": c, "params": p}) for c, p in requests]
    assert len(BatchBody(lambda: iter(rows), lambda: map(len, rows))) == len(expected)


@pytest.mark.parametrize(
    ("error_type", "status"), [("overloaded_error", 529), ("api_error", 500), ("rate_limit_error", 429)]
)
def test_an_error_event_in_a_stream_is_the_error_its_status_would_be(error_type: str, status: int) -> None:
    # What the SDK raises for an SSE `error` event: the stream's own 200 response, the event's error as the body.
    response = httpx2.Response(200, request=httpx2.Request("POST", "https://api.example/v1/messages"))
    body = {"type": "error", "error": {"type": error_type, "message": "mid-stream"}}
    sdk_error = anthropic.APIStatusError("mid-stream", response=response, body=body)

    error = translate(sdk_error)

    assert isinstance(error, TransientApiError)
    assert (error.status, error.error_type) == (status, error_type)

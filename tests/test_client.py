"""Pure parts of the API client."""

from __future__ import annotations

import orjson
import pytest

from batch_engine.client import batch_body


@pytest.mark.parametrize("rows", [0, 1, 999, 1000, 1001, 2500])
def test_the_batch_body_is_the_requests_document_whatever_the_block_boundaries(rows: int) -> None:
    requests = [(f"c{i}", {"model": "m", "max_tokens": i, "messages": [{"role": "user", "content": "é" * i}]})
                for i in range(rows)]  # fmt: skip

    body = batch_body(iter(requests))

    expected = {"requests": [{"custom_id": custom_id, "params": params} for custom_id, params in requests]}
    assert body == orjson.dumps(expected)

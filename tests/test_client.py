"""Pure parts of the API client."""

from __future__ import annotations

import orjson
import pytest

from batch_engine.client import BatchBody


@pytest.mark.parametrize("rows", [0, 1, 999, 1000, 1001, 2500])
def test_the_batch_body_is_the_requests_document_whatever_the_block_boundaries(rows: int) -> None:
    requests = [(f"c{i}", {"model": "m", "max_tokens": i, "messages": [{"role": "user", "content": "é" * i}]})
                for i in range(rows)]  # fmt: skip

    body = BatchBody(lambda: iter(requests))

    expected = orjson.dumps({"requests": [{"custom_id": c, "params": p} for c, p in requests]})
    assert b"".join(body.blocks()) == expected
    assert len(body) == len(expected)
    assert b"".join(body.blocks()) == expected  # every pass gives the same bytes

"""Curator's round of `python -m batch_engine.bench faults --curator-python PY`: run by that interpreter (a venv
with `bespokelabs-curator` installed, never a dependency of batch_engine), standard library and Curator only.

    PY batch_engine/bench/curator.py BASE_URL REQUEST_FILE

REQUEST_FILE is JSON: model, max_tokens, system, thinking, prompts, concurrency. Curator's Anthropic backend
sends each prompt as one Messages request with those params, at `max_concurrent_requests = concurrency` and
its own defaults otherwise (retries, its pause on a 429). Prints one JSON line: seconds and failed tasks.

Two things are set so that Curator can run offline against the emulator at all, and are no change to how it
sends: its rate-limit probe asks `claude-3-5-sonnet-latest`, a model the API no longer serves (the emulator
answers 404, as the API does, and Curator stops), so the probe asks the bench's model instead; and its token
estimate loads tiktoken's cl100k_base, which it would download, from the copy litellm (a Curator dependency)
ships.
"""

from __future__ import annotations

import json  # noqa: TID251 -- runs in Curator's venv, which has no orjson
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    base_url, request_file = sys.argv[1], sys.argv[2]
    spec: dict[str, Any] = json.loads(Path(request_file).read_text())
    os.environ["ANTHROPIC_API_KEY"] = "bench"
    os.environ["TELEMETRY_ENABLED"] = "false"  # no network here: Curator's PostHog upload would only log errors
    cache = tempfile.mkdtemp(prefix="curator-cache-")
    os.environ["CURATOR_CACHE_DIR"] = cache  # a fresh cache: nothing answered from an earlier round

    import litellm  # type: ignore[import-not-found,unused-ignore]

    os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(litellm.__file__).parent / "litellm_core_utils" / "tokenizers")

    from anthropic import Anthropic
    from bespokelabs import curator  # type: ignore[import-not-found,unused-ignore]
    from bespokelabs.curator.request_processor.online import (  # type: ignore[import-not-found,unused-ignore]
        anthropic_online_request_processor as processor,
    )

    def probe(_: object) -> Any:
        client = Anthropic(base_url=base_url, api_key="bench", max_retries=10)
        messages: Any = [{"role": "user", "content": "Hello"}]
        reply = client.messages.with_raw_response.create(model=spec["model"], max_tokens=16, messages=messages)
        return reply.headers

    processor.AnthropicOnlineRequestProcessor.test_call = probe
    llm = curator.LLM(
        model_name=spec["model"],
        backend="anthropic",
        backend_params={
            "base_url": f"{base_url}/v1",
            "api_key": "bench",
            "max_concurrent_requests": spec["concurrency"],
            "require_all_responses": False,  # count the failed tasks instead of raising
        },
        generation_params={"max_tokens": spec["max_tokens"], "system": spec["system"], "thinking": spec["thinking"]},
    )
    prompts: list[str] = spec["prompts"]
    started = time.perf_counter()
    answered = llm(prompts)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "failed": len(prompts) - len(answered.dataset)}))


if __name__ == "__main__":
    main()

"""A local Anthropic API emulator: Messages, count_tokens, Message Batches, caching, rate limits, faults.

The real `anthropic` SDK talks to it unchanged; only `base_url` differs:

    with start_emulator(EmulatorSettings(batch_duration_s=0)) as emu:
        client = anthropic.AsyncAnthropic(base_url=emu.base_url, api_key="any")

`emulator_process(...)` runs it in a process of its own instead (`batch-engine emulator --port 0 ...`).
"""

from batch_engine.emulator.app import EmulatorApp
from batch_engine.emulator.process import EmulatorProcess, emulator_process
from batch_engine.emulator.replies import reply_digest
from batch_engine.emulator.server import RunningEmulator, serve_forever, start_emulator
from batch_engine.emulator.settings import ENDPOINTS, EmulatorSettings
from batch_engine.emulator.tokenizer import text_tokens

__all__ = [
    "ENDPOINTS",
    "EmulatorApp",
    "EmulatorProcess",
    "EmulatorSettings",
    "RunningEmulator",
    "emulator_process",
    "reply_digest",
    "serve_forever",
    "start_emulator",
    "text_tokens",
]

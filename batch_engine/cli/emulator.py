"""`batch-engine emulator`: serve the local Anthropic API emulator (simulated results, no key, no spend)."""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING

from batch_engine.cli.args import duration, rate

if TYPE_CHECKING:
    pass


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `emulator` on the `batch-engine` parser."""
    parser = sub.add_parser(
        "emulator",
        help="serve the local Anthropic API emulator (simulated results, no key, no spend)",
        description="Serve a local emulator of the Anthropic Messages and Message Batches APIs. Point the "
        "SDK (or `batch-engine run`) at it with ANTHROPIC_BASE_URL. Durations accept 250ms, 2s, 5m, 1h.",
        epilog="Always on, from Anthropic's docs: the rules of the request's anthropic-version (2026-10-21, what "
        "SDK 2.x sends, refuses temperature/top_p/top_k on every model; 2023-06-01 keeps the old rules); per-model "
        "thinking defaults, off values and their 400s; forced tool_choice refused on Opus 5.5, Sonnet 5.5 and Fable "
        "5.1; a tokenizer of its own per model family (5.x counts ~1.3x); 400 'prompt is too long' over the context "
        "window; x-should-retry on every error. Scripted one-shot faults (POST /_emulator/faults {endpoint, kind, "
        "count}), kinds: 429, 529, 500, drop, error_event, spend_limit (a 429), spend_limit_400 (self-set), "
        "spend_limit_402 (linked organization), 500_no_retry (a 500 with x-should-retry false), after_commit (the "
        "work done, then a 500 or 529), after_commit_no_retry (the work done, then that 500).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    parser.add_argument("--latency", type=duration, default=0.0, help="added to every Messages call")
    parser.add_argument("--jitter", type=duration, default=0.0, help="random extra latency, 0..JITTER")
    for name in ("rpm", "itpm", "otpm", "batch-rpm", "count-tokens-rpm"):
        limit = name.replace("-", " ").upper()
        parser.add_argument(f"--{name}", type=int, help=f"enforce this {limit} limit")
    parser.add_argument(
        "--fault-rate",
        action="append",
        default=[],
        type=_fault_rate,
        metavar="KIND=RATE",
        help=f"inject faults, repeatable; KIND is one of {', '.join(_FAULT_SETTINGS)}",
    )
    parser.add_argument("--fault-endpoints", default="messages", help="endpoints random faults hit (*: all)")
    parser.add_argument(
        "--fault-after-commit",
        type=rate,
        default=0.0,
        metavar="RATE",
        help="share of batches.create and Messages calls that do their work (the batch is created, the message "
        "answered and billed) and then answer 500 or 529, as an API without idempotency keys can",
    )
    parser.add_argument("--row-error-type", default="api_error", help="error type of injected errored rows")
    parser.add_argument("--batch-duration", type=duration, default=2.0, help="time a batch takes to end")
    parser.add_argument("--batch-never-ends", action="store_true", help="batches end only by expiring")
    parser.add_argument("--time-scale", type=float, default=1.0, help="emulator clock speed (3600: 1 h/s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for faults and jitter")
    parser.add_argument("--reply-tokens", type=int, help="fixed reply length in tokens (default: varies)")
    parser.add_argument(
        "--invalid-output-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="share (0..1) of JSON answers (output_config.format or a forced tool) made not to match their schema: "
        "a required property left out, or prose (default 0: every JSON answer validates)",
    )
    parser.add_argument(
        "--refusal-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="share (0-1) of Messages and batch rows answered stop_reason refusal, billed (default 0)",
    )
    parser.add_argument(
        "--pause-turn-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="share (0-1) of Messages and batch rows with a server tool (web search, web fetch, code execution) "
        "answered stop_reason pause_turn, billed: the server tool loop hit its iteration limit (default 0)",
    )
    parser.add_argument(
        "--batch-queue-cap",
        type=int,
        metavar="N",
        help="requests allowed waiting in the batch processing queue; a create over it is a 429 (default: none)",
    )
    parser.add_argument(
        "--batch-cache-hit-rate",
        type=float,
        default=0.6,
        metavar="F",
        help="share (0-1) of batch rows that read a live cache entry; the rest write it again (default 0.6)",
    )
    parser.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    parser.add_argument("--config", help="ignored: the emulator serves its own models, from Anthropic's docs")
    parser.add_argument("--state-file", help="keep batches, cache and stats in this file across restarts")
    parser.set_defaults(func=_run_emulator)


_FAULT_SETTINGS = {
    "429": "fault_rate_429",
    "529": "fault_rate_529",
    "500": "fault_rate_500",
    "drop": "fault_rate_drop",
    "row_error": "batch_row_error_rate",
    "row_expire": "batch_row_expire_rate",
}


def _fault_rate(text: str) -> tuple[str, float]:
    kind, _, rate = text.partition("=")
    if kind not in _FAULT_SETTINGS:
        raise argparse.ArgumentTypeError(f"unknown fault kind {kind!r}; use {', '.join(_FAULT_SETTINGS)}")
    try:
        return _FAULT_SETTINGS[kind], float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: RATE must be a number between 0 and 1") from None


def _run_emulator(args: argparse.Namespace) -> int:

    from pydantic import ValidationError

    from batch_engine.emulator import EmulatorSettings, serve_forever
    from batch_engine.errors import ConfigError

    options = {
        "latency_s": args.latency,
        "jitter_s": args.jitter,
        "rpm": args.rpm,
        "itpm": args.itpm,
        "otpm": args.otpm,
        "batch_rpm": args.batch_rpm,
        "count_tokens_rpm": args.count_tokens_rpm,
        "fault_endpoints": tuple(args.fault_endpoints.split(",")),
        "fault_after_commit_rate": args.fault_after_commit,
        "batch_row_error_type": args.row_error_type,
        "batch_duration_s": args.batch_duration,
        "batch_never_ends": args.batch_never_ends,
        "time_scale": args.time_scale,
        "seed": args.seed,
        "reply_tokens": args.reply_tokens,
        "invalid_output_rate": args.invalid_output_rate,
        "refusal_rate": args.refusal_rate,
        "pause_turn_rate": args.pause_turn_rate,
        "batch_queue_cap": args.batch_queue_cap,
        "batch_cache_hit_rate": args.batch_cache_hit_rate,
        "api_key": args.api_key,
        "config_path": args.config,
        "state_file": args.state_file,
        **dict(args.fault_rate),
    }
    try:
        settings = EmulatorSettings.model_validate(options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise ConfigError(f"emulator: {where}: {first['msg']}") from None

    def ready(base_url: str) -> None:
        print(f"Anthropic API emulator listening on {base_url} (simulated: any key works, nothing is billed)")
        print(f"  export ANTHROPIC_BASE_URL={base_url}", flush=True)

    # Ctrl-C is the normal way to stop it; uvicorn shuts down gracefully (and saves --state-file) first.
    with contextlib.suppress(KeyboardInterrupt):
        serve_forever(settings, host=args.host, port=args.port, on_ready=ready)
    print("Emulator stopped.", flush=True)
    return 0

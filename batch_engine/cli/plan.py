"""`batch-engine plan | validate | schema`: what a task file will do and cost, its rejections, the JSON Schemas."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from batch_engine.cli.args import add_state_url, state_of
from batch_engine.config import Config, load_config
from batch_engine.files import dumps, iter_records
from batch_engine.planning import Plan, make_plan
from batch_engine.planning.plan_summary import plan_summary, render_plan_summary
from batch_engine.runner import DEFAULT_STATE_DIR
from batch_engine.schema import json_schema

if TYPE_CHECKING:
    from batch_engine.client import ApiSettings
    from batch_engine.planning.tokens import TokenCounts


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `plan`, `validate` and `schema` on the `batch-engine` parser."""
    plan = sub.add_parser("plan", help="show routes, batches and the estimated cost of a task file")
    plan.add_argument("input", type=Path)
    plan.add_argument("--config", type=Path, default=None)
    plan.add_argument("--json", action="store_true", help="print machine-readable JSON")
    plan.add_argument(
        "--count-tokens", action="store_true", help="exact input counts via messages.count_tokens (needs the API)"
    )
    plan.add_argument("--emulate", action="store_true", help="count against the built-in emulator")
    plan.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="its usage log informs output estimates"
    )
    add_state_url(plan)
    plan.set_defaults(func=_plan)

    validate = sub.add_parser("validate", help="check a task file; list rejections")
    validate.add_argument("input", type=Path)
    validate.add_argument("--config", type=Path, default=None)
    validate.set_defaults(func=_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of the input or output")
    schema.add_argument("kind", choices=["input", "output"])
    schema.set_defaults(func=_schema)


def _load_plan(args: argparse.Namespace) -> tuple[Config, Plan]:
    config = load_config(args.config)
    return config, make_plan(iter_records(args.input), config, datetime.now(UTC))


def _plan(args: argparse.Namespace) -> int:
    from batch_engine.planning.budget import Estimator
    from batch_engine.state.backend import open_usage_log, usage_log_exists
    from batch_engine.state.usage_log import output_history

    config, plan = _load_plan(args)
    history: dict[tuple[str, str], int] = {}
    state = state_of(args, config)
    if usage_log_exists(state):
        with open_usage_log(state) as log:
            history = output_history(log.recent_outputs())
    counts = _count_tokens(plan, config, args) if args.count_tokens else None
    estimator = Estimator(config, counts.by_index if counts else {}, history)
    summary = plan_summary(plan, config, estimator, counts)
    if args.json:
        sys.stdout.write(dumps(summary.model_dump(mode="json")).decode() + "\n")
    else:
        print(render_plan_summary(summary))
    return 0


def _count_tokens(plan: Plan, config: Config, args: argparse.Namespace) -> TokenCounts:
    import asyncio

    from batch_engine.client import make_client
    from batch_engine.token_count import count_plan_tokens

    async def count(api: ApiSettings) -> TokenCounts:
        client = make_client(api)
        try:
            return await count_plan_tokens(client, plan.tasks, config.limits.count_tokens_rpm)
        finally:
            await client.close()

    with api_settings(args.emulate, args.config) as api:
        return asyncio.run(count(api))


@contextlib.contextmanager
def api_settings(emulate: bool, config_path: Path | None) -> Iterator[ApiSettings]:
    """The API to talk to: the built-in emulator (started here) with --emulate, else the environment's key."""
    from pydantic import SecretStr

    from batch_engine.client import ApiSettings, api_from_environment
    from batch_engine.errors import ConfigError

    if emulate:
        from batch_engine.emulator import EmulatorSettings, start_emulator

        with start_emulator(EmulatorSettings(config_path=config_path)) as emulator:
            print(f"SIMULATED: using the built-in emulator at {emulator.base_url}; nothing is billed.", file=sys.stderr)
            yield ApiSettings(SecretStr("emulated"), emulator.base_url)
        return
    api = api_from_environment()
    if api is None:
        raise ConfigError(
            "no API key: set ANTHROPIC_API_KEY to use the Anthropic API, "
            "or pass --emulate to use the built-in emulator (simulated results, nothing billed)"
        )
    yield api


def _validate(args: argparse.Namespace) -> int:
    _, plan = _load_plan(args)
    for rejection in plan.rejections:
        print(rejection.one_line())
    for warning in plan.warnings:
        print(warning)
    print(f"{plan.total_records} records: {len(plan.tasks)} valid, {len(plan.rejections)} rejected")
    return 1 if plan.rejections else 0


def _schema(args: argparse.Namespace) -> int:
    sys.stdout.write(dumps(json_schema(args.kind)).decode() + "\n")
    return 0

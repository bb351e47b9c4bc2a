"""`batch-engine cache-stats | report`: what the usage log says about the bill (cache hit rate, advice)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from batch_engine.cli.args import add_state_url, state_of
from batch_engine.cli.run import quiet_prefect_console
from batch_engine.config import load_config
from batch_engine.files import dumps, iter_records
from batch_engine.planning import make_plan
from batch_engine.runner import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from batch_engine.render.advice_report import ReportDocuments
    from batch_engine.state.usage_log import UsageRecord


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `cache-stats` and `report` on the `batch-engine` parser."""
    stats = sub.add_parser("cache-stats", help="prompt-cache hit rate by tokens, savings, and why it is low")
    stats.add_argument("--days", type=float, default=7.0, help="look back this many days (default 7)")
    stats.add_argument("--by", choices=["task_type", "model", "route"], default="task_type")
    stats.add_argument("--json", action="store_true", help="print machine-readable JSON")
    stats.add_argument("--config", type=Path, default=None, help="price table (default: the shipped one)")
    stats.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    add_state_url(stats)
    stats.set_defaults(func=_cache_stats)

    report = sub.add_parser("report", help="optimization report from the usage log (Markdown)")
    report.add_argument("--days", type=float, default=30.0, help="look back this many days (default 30)")
    report.add_argument("--output", type=Path, default=Path("report.md"), help="where to write it")
    report.add_argument(
        "--analyze-only", action="store_true", help="print the report; write nothing (no report file, no config)"
    )
    report.add_argument("--html", type=Path, metavar="FILE", help="also write one self-contained page of charts")
    report.add_argument(
        "--prefect-artifact",
        action="store_true",
        help="also publish the charts as a Markdown artifact on the Prefect server in PREFECT_API_URL",
    )
    report.add_argument("--config", type=Path, default=None, help="price table and tiers (default: the shipped one)")
    report.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    add_state_url(report)
    report.add_argument("--plan", type=Path, metavar="INPUT", help="also analyse this task file before it runs")
    report.add_argument(
        "--scope",
        choices=["caching", "model", "streaming", "thinking", "batching", "all"],
        default="all",
        help="only this part of the report (thinking includes max_tokens; default all)",
    )
    report.add_argument(
        "--model",
        choices=["haiku", "sonnet", "opus"],
        default=None,
        help="price the workload on this tier of the config (model scope; default: the cheap tier)",
    )
    report.add_argument(
        "--write-config",
        type=Path,
        metavar="FILE",
        help="write the config (--config, or the shipped one) with the recommended changes applied and commented",
    )
    report.set_defaults(func=_report)


def _usage_records(args: argparse.Namespace, days: float) -> list[UsageRecord]:
    """The usage log's records of the last `days`: this machine's files, or the team's shared database."""
    import time

    from batch_engine.errors import ConfigError
    from batch_engine.state.backend import open_usage_log, usage_log_exists
    from batch_engine.state.usage_log import USAGE_FILE

    state = state_of(args, load_config(args.config))
    if not usage_log_exists(state):
        raise ConfigError(f"{args.state_dir / USAGE_FILE}: no usage log yet (it is written by `batch-engine run`)")
    with open_usage_log(state) as log:
        return log.records(since=time.time() - days * 86_400)


def _cache_stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from batch_engine.telemetry.cache_stats import cache_stats

    rows = cache_stats(_usage_records(args, args.days), args.by, load_config(args.config))
    if args.json:
        sys.stdout.write(dumps([row.as_json() for row in rows]).decode() + "\n")
        return 0
    table = Table(title=f"Prompt cache, last {args.days:g} days, by {args.by}", title_justify="left")
    for column in (args.by, "requests", "hit rate (tokens)", "read", "written", "uncached", "saved"):
        table.add_column(column, justify="left" if column == args.by else "right")
    for row in rows:
        table.add_row(
            row.group,
            str(row.requests),
            f"{row.hit_rate:.1%}",
            f"{row.cache_read:,}",
            f"{row.cache_write:,}",
            f"{row.uncached_input:,}",
            f"${row.saved_usd:.4f}",
        )
    console = Console()
    console.print(table)
    for row in rows:
        for reason in row.diagnosis:
            console.print(f"[bold]{row.group}[/bold] ({row.hit_rate:.0%}): {reason}", highlight=False)
    return 0


def _report(args: argparse.Namespace) -> int:
    import time

    from batch_engine.config import default_config_text
    from batch_engine.errors import ConfigError
    from batch_engine.files import atomic_write_bytes, read_text
    from batch_engine.render.advice_report import ConfigSource, report_documents
    from batch_engine.telemetry.advice import SCOPES

    if args.analyze_only and args.write_config is not None:
        raise ConfigError("--analyze-only writes nothing: drop --write-config, or drop --analyze-only")
    if args.analyze_only and args.html is not None:
        raise ConfigError("--analyze-only writes nothing: drop --html, or drop --analyze-only")
    for path in (args.output, args.write_config):
        if path is not None and path.is_dir() and not args.analyze_only:
            raise ConfigError(f"{path}: is a directory; give a file name")
    scopes = SCOPES if args.scope == "all" else (args.scope,)
    if args.model is not None and "model" not in scopes:
        raise ConfigError(f"--model prices the model scope: use it with --scope model or all, not {args.scope}")
    records = _usage_records(args, args.days)
    config = load_config(args.config)
    plan = (
        None if args.plan is None else (str(args.plan), make_plan(iter_records(args.plan), config, datetime.now(UTC)))
    )
    source = None
    if args.write_config is not None:
        if args.config is None:
            source = ConfigSource(default_config_text(), "default_config.toml")
        else:
            source = ConfigSource(read_text(args.config), str(args.config))
    documents = report_documents(records, config, time.time(), scopes, args.model, plan=plan, config_source=source)
    if args.analyze_only:
        sys.stdout.write(documents.markdown)
        _report_charts(args, records, documents)
        return 0
    atomic_write_bytes(args.output, documents.markdown.encode())
    print(f"wrote {args.output}")
    if documents.config_text is not None:
        atomic_write_bytes(args.write_config, documents.config_text.encode())
        changes = len(documents.report.config_changes)
        print(f"wrote {args.write_config} ({changes} changes; review, then use it with --config)")
    _report_charts(args, records, documents)
    return 0


def _report_charts(args: argparse.Namespace, records: list[UsageRecord], documents: ReportDocuments) -> None:
    """The report's charts: one self-contained HTML page (--html), a Prefect Markdown artifact (--prefect-artifact)."""
    import os

    from batch_engine.errors import ConfigError
    from batch_engine.files import atomic_write_bytes
    from batch_engine.render.charts import html_page, markdown_charts

    if args.html is None and not args.prefect_artifact:
        return
    if args.html is not None:
        atomic_write_bytes(args.html, html_page(records, documents.advice, args.days).encode())
        print(f"wrote {args.html}")
    if args.prefect_artifact:
        if not os.environ.get("PREFECT_API_URL"):
            raise ConfigError("--prefect-artifact needs a Prefect server: set PREFECT_API_URL")
        from batch_engine.orchestration.report_charts import CHARTS_ARTIFACT_KEY, publish_report_charts

        quiet_prefect_console()
        publish_report_charts(markdown_charts(records, documents.advice))
        print(f"published the Prefect artifact {CHARTS_ARTIFACT_KEY}")

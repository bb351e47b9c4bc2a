"""Pure: everything `batch-engine report` writes, from the usage records: the Markdown report, the advice its
charts list, and (when asked) the config with the report's changes applied for review."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batch_engine.config import Config
from batch_engine.planning import Plan
from batch_engine.planning.budget import Estimator
from batch_engine.render.advice_markdown import render_report
from batch_engine.render.charts import Advice
from batch_engine.state.usage_log import UsageRecord, observations, output_history
from batch_engine.telemetry.advice import OptimizationReport, Scope, analyze
from batch_engine.telemetry.config_patch import apply_changes, change_comment


@dataclass(frozen=True)
class ConfigSource:
    """The config text the reviewed copy starts from, and the name its comments give it."""

    text: str
    name: str


@dataclass(frozen=True)
class ReportDocuments:
    report: OptimizationReport
    markdown: str
    advice: list[Advice]
    config_text: str | None  # the reviewed config, only when a ConfigSource was given


def report_documents(
    records: Sequence[UsageRecord],
    config: Config,
    now: float,
    scopes: Sequence[Scope],
    model: str | None,
    *,
    plan: tuple[str, Plan] | None = None,
    config_source: ConfigSource | None = None,
) -> ReportDocuments:
    """Analyse `records` and produce what the report command writes; `plan` adds what that plan could save."""
    report = analyze(records, config, now, scopes, model)
    planned = None
    if plan is not None:
        name, the_plan = plan
        planned = (name, the_plan, Estimator(config, output_history=output_history(observations(records))))
    config_text = None
    if config_source is not None:
        changes = [(rec.config_change, change_comment(rec, report.period)) for rec in report.config_changes]
        applicable = [(change, note) for change, note in changes if change is not None]
        config_text = apply_changes(config_source.text, config, applicable, config_source.name)
    return ReportDocuments(report, render_report(report, planned), _advice(report), config_text)


def _advice(report: OptimizationReport) -> list[Advice]:
    found = [Advice(r.title, r.detail, r.saved_usd, "saves") for r in report.savings]
    found += [Advice(r.title, r.detail, r.at_stake_usd, "at stake") for r in report.trials]
    found += [Advice(r.title, r.detail, None, "frees budget, not the bill") for r in report.budget]
    found += [Advice(r.title, r.detail, None, "no change to the bill") for r in report.no_bill_change]
    return found

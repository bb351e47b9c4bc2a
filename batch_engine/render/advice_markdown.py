"""Pure: the optimization report as Markdown — a bill a finance person can read: today, per month, after."""

from __future__ import annotations

from datetime import UTC, datetime

from batch_engine.planning import Plan
from batch_engine.planning.budget import Estimator
from batch_engine.telemetry.advice import (
    DAYS_PER_MONTH,
    OptimizationReport,
    Recommendation,
    Section,
    plan_recommendations,
    usd,
)

_SECTION_TITLES = {
    "caching": "Caching",
    "model": "Model",
    "streaming": "Streaming",
    "thinking": "Thinking and max_tokens",
    "batching": "Batching",
}


def render_report(report: OptimizationReport, plan: tuple[str, Plan, Estimator] | None = None) -> str:
    """The Markdown report; with `plan` (its name, the plan, its estimator) also what that plan could save."""
    period = report.period
    first = datetime.fromtimestamp(period.first_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    month = period.monthly
    saved_today = report.baseline_usd - report.spend_usd
    lines = [
        "# batch_engine optimization report",
        "",
        (
            f"Usage log: {report.requests} billed requests, the first at {first}."
            if report.requests
            else "Usage log: no billed requests in the period."
        )
        + f" Scope: {', '.join(report.scopes)}.",
        f"Per month: the log covers {period.days} day{'s' if period.days > 1 else ''} (first request to now, "
        f"rounded up to whole days), so a month ({DAYS_PER_MONTH} days) at the same volume is "
        f"{period.monthly_factor:g} x the period.",
        "",
        "| | this period | per month |",
        "|---|---:|---:|",
        f"| Spend | {usd(report.spend_usd)} | {usd(month(report.spend_usd))} |",
        f"| Same tokens all realtime, no caching | {usd(report.baseline_usd)} | {usd(month(report.baseline_usd))} |",
        f"| Saved today by batching and caching | {usd(saved_today)} | {usd(month(saved_today))} |",
        f"| Spend with every saving below applied | {usd(report.combined_after_usd)} | "
        f"{usd(month(report.combined_after_usd))} |",
        f"| Saved by applying them | {usd(report.spend_usd - report.combined_after_usd)} | "
        f"{usd(month(report.spend_usd - report.combined_after_usd))} |",
        "",
    ]
    lines += _savings(report)
    lines += _budget(report)
    lines += _others(report)
    for section in report.sections:
        lines += _section(report, section)
    for title, rows in report.spend_by.items():
        lines += [
            f"## Spend by {title}",
            "",
            f"| {title} | requests | cost | all realtime, no caching | saved |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.name} | {r.requests} | {usd(r.cost_usd)} | {usd(r.baseline_usd)} | "
            f"{usd(r.baseline_usd - r.cost_usd)} |"
            for r in rows
        ]
        lines.append("")
    if plan is not None:
        lines += _plan(*plan)
    return "\n".join(lines).rstrip("\n") + "\n"


def _savings(report: OptimizationReport) -> list[str]:
    month = report.period.monthly
    lines = ["## Savings on the bill, most money first", ""]
    if not report.savings:
        return [*lines, "None: no change the usage log supports would lower the bill.", ""]
    lines += ["| # | change | today per month | after | saved per month |", "|---:|---|---:|---:|---:|"]
    for number, rec in enumerate(report.savings, 1):
        lines.append(
            f"| {number} | **{rec.title}**: {rec.change} | {usd(month(rec.before_usd))} | "
            f"{usd(month(rec.after_usd))} | **{usd(month(rec.saved_usd))}** |"
        )
    return [
        *lines,
        "",
        "Each line is priced against today's bill on its own, on the same tokens at list prices; two changes to "
        "the same task type overlap, so the total above prices them applied together.",
        "",
    ]


def _budget(report: OptimizationReport) -> list[str]:
    if not report.budget and not report.max_tokens:
        return []
    lines = [
        "## Budget freed (not billed: no saving on the bill)",
        "",
        "Unused max_tokens is never billed, but budgets (`--max-cost-usd`) and pre-flight estimates reserve it. "
        "Thinking counts toward max_tokens, so the advice keeps room for the most thinking seen. `--write-config` "
        "leaves max_tokens as is for a task type it also moves to another tier (that model's thinking is unseen).",
        "",
    ]
    if report.max_tokens:
        lines += [
            "| task type | model | requests | max_tokens | visible output p99 | thinking p99 | thinking max | "
            "hit max_tokens | needs (2 x (visible + thinking)) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {f.task_type} | {f.model} | {f.requests} | {f.max_tokens} | {f.visible_p99} | {f.thinking_p99} | "
            f"{f.thinking_max} | {f.truncated} | {f.recommended} |"
            for f in report.max_tokens
        ]
        lines.append("")
    lines += [f"- `{rec.task_type}`: {rec.current} → {rec.change}" for rec in report.budget]
    return [*lines, ""] if report.budget else lines


def _others(report: OptimizationReport) -> list[str]:
    month = report.period.monthly
    lines: list[str] = []
    if report.trials:
        lines += ["## Worth a trial (the log cannot price it)", ""]
        lines += [
            f"- **{rec.title}**: {rec.change} ({usd(month(rec.at_stake_usd))}/month of thinking at stake)"
            for rec in report.trials
        ]
        lines.append("")
    if report.no_bill_change:
        lines += ["## No change to the bill", ""]
        lines += [f"- **{rec.title}**: {rec.change}" for rec in report.no_bill_change]
        lines.append("")
    return lines


def _section(report: OptimizationReport, section: Section) -> list[str]:
    lines = [f"## {_SECTION_TITLES[section.scope]}", "", f"Today: {section.current}", ""]
    if section.scope == "model" and report.tier_costs:
        lines += [
            f"| task type | model | requests | output p95 | per month | on {report.target_model} |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {row.task_type} | {row.model} | {row.requests} | {row.output_p95} | "
            f"{usd(report.period.monthly(row.cost_usd))} | {usd(report.period.monthly(row.on_target_usd))} |"
            for row in report.tier_costs
        ]
        lines.append("")
    if not section.recommendations:
        return [*lines, "Nothing to change.", ""]
    ordered = sorted(section.recommendations, key=lambda r: (-r.saved_usd, -r.at_stake_usd))
    lines += [_recommendation(report, rec) for rec in ordered]
    return [*lines, ""]


def _recommendation(report: OptimizationReport, rec: Recommendation) -> str:
    month = report.period.monthly
    if rec.kind == "saving":
        figure = (
            f"per month {usd(month(rec.before_usd))} → {usd(month(rec.after_usd))}, "
            f"saves **{usd(month(rec.saved_usd))}**"
        )
    elif rec.kind == "trial":
        figure = f"{usd(month(rec.at_stake_usd))}/month at stake, saving unknown until tried"
    elif rec.kind == "budget":
        figure = "frees budget, saves nothing on the bill"
    else:
        figure = "same bill"
    return f"- **{rec.title}** ({figure}). Today: {rec.current}. Change: {rec.change}. {rec.detail}"


def _plan(name: str, planned: Plan, estimator: Estimator) -> list[str]:
    expected = sum(estimator.cost(t, t.route) for t in planned.tasks)
    lines = [
        f"## Plan: {name}",
        "",
        f"{len(planned.tasks)} tasks ({len(planned.batch_tasks())} batch, {len(planned.realtime_tasks())} "
        f"realtime), estimated ${expected:.4f} before caching.",
        "",
    ]
    for number, rec in enumerate(plan_recommendations(planned, estimator), 1):
        lines += [f"{number}. **{rec.title}** — ${rec.saved_usd:.4f}", f"   {rec.detail}"]
    return [*lines, ""]

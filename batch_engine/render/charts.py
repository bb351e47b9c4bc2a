"""Pure: the usage log as pictures — spend per day by route and model, cost against the all-realtime no-cache
baseline per day, prompt-cache hit rate (by tokens) per day, and the report's recommendations with their dollar
figures — as one self-contained HTML page (inline SVG, no script, no network) or as Markdown for a Prefect
artifact (tables with text bars: Prefect's Markdown shows no SVG).

Every chart element carries its figures in `data-*` attributes, so a test (or a curious user) can check the
picture against the usage log.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from batch_engine.state.usage_log import UsageRecord

_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f", "#bab0ac")
_WIDTH, _HEIGHT, _LEFT, _BOTTOM, _TOP = 760, 260, 70, 40, 16
_BAR_CELLS = 24  # width of a text bar in the Markdown version


@dataclass(frozen=True, slots=True)
class Advice:
    """One recommendation of the optimization report as the charts show it: what, why, and its dollar figure."""

    title: str
    detail: str
    usd: float | None  # None: no dollar figure (it changes a budget, not the bill)
    figure: str  # how to read `usd`, e.g. "saves" or "at stake"; the whole figure when `usd` is None

    def figure_text(self) -> str:
        return self.figure if self.usd is None else f"{self.figure} ${self.usd:.4f}"


@dataclass(frozen=True, slots=True)
class Day:
    """One UTC day of the usage log."""

    day: str  # YYYY-MM-DD
    spend: dict[str, float]  # "route / model" -> dollars
    cost_usd: float
    baseline_usd: float
    cache_read: int
    cache_write: int
    uncached_input: int

    @property
    def hit_rate(self) -> float | None:
        """Cache reads over all prompt tokens; None on a day with no prompt tokens."""
        total = self.cache_read + self.cache_write + self.uncached_input
        return self.cache_read / total if total else None


def daily(records: Sequence[UsageRecord]) -> list[Day]:
    """The usage log summed per UTC day, oldest first."""
    groups: dict[str, list[UsageRecord]] = defaultdict(list)
    for record in records:
        groups[datetime.fromtimestamp(record.at, UTC).strftime("%Y-%m-%d")].append(record)
    days = []
    for day, group in sorted(groups.items()):
        spend: dict[str, float] = defaultdict(float)
        for record in group:
            spend[f"{record.route} / {record.model}"] += record.cost_usd
        days.append(
            Day(
                day=day,
                spend=dict(spend),
                cost_usd=sum(r.cost_usd for r in group),
                baseline_usd=sum(r.baseline_usd for r in group),
                cache_read=sum(r.cache_read_tokens for r in group),
                cache_write=sum(r.cache_write_tokens for r in group),
                uncached_input=sum(r.input_tokens for r in group),
            )
        )
    return days


def _series(days: Sequence[Day]) -> list[str]:
    return sorted({name for day in days for name in day.spend})


def _y(value: float, top: float) -> float:
    plot = _HEIGHT - _BOTTOM - _TOP
    return _HEIGHT - _BOTTOM - (value / top * plot if top else 0.0)


def _frame(title: str, label: str, top: float, fmt: str, days: Sequence[Day], body: list[str]) -> str:
    """An SVG chart: title, y axis from 0 to `top` (`fmt` formats its ticks), one x label per day, `body`."""
    step = (_WIDTH - _LEFT - 10) / max(len(days), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" role="img" '
        f'aria-label="{html.escape(title)}" data-chart="{html.escape(label)}">',
        f'<line x1="{_LEFT}" y1="{_HEIGHT - _BOTTOM}" x2="{_WIDTH - 10}" y2="{_HEIGHT - _BOTTOM}" stroke="#888"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_HEIGHT - _BOTTOM}" stroke="#888"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = _y(top * fraction, top)
        tick = fmt.format(top * fraction)
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{tick}</text>')
    for index, day in enumerate(days):
        x = _LEFT + step * (index + 0.5)
        parts.append(
            f'<text x="{x:.1f}" y="{_HEIGHT - _BOTTOM + 16}" text-anchor="middle" font-size="11">{day.day}</text>'
        )
    parts += body
    parts.append("</svg>")
    return "\n".join(parts)


def spend_chart(days: Sequence[Day]) -> str:
    """Stacked bars: each day's spend, one colour per route / model."""
    series = _series(days)
    top = max((day.cost_usd for day in days), default=0.0) or 1.0
    step = (_WIDTH - _LEFT - 10) / max(len(days), 1)
    body = []
    for index, day in enumerate(days):
        x = _LEFT + step * index + step * 0.2
        base = 0.0
        for number, name in enumerate(series):
            usd = day.spend.get(name, 0.0)
            if not usd:
                continue
            y_top, y_base = _y(base + usd, top), _y(base, top)
            body.append(
                f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{step * 0.6:.1f}" height="{y_base - y_top:.1f}" '
                f'fill="{_PALETTE[number % len(_PALETTE)]}" data-day="{day.day}" data-series="{html.escape(name)}" '
                f'data-usd="{usd:.6f}"><title>{day.day} {html.escape(name)}: ${usd:.4f}</title></rect>'
            )
            base += usd
    return _frame("Spend per day by route and model", "spend", top, "${:.4f}", days, body)


def savings_chart(days: Sequence[Day]) -> str:
    """Paired bars per day: the all-realtime no-cache baseline and what was billed; the saving above them."""
    # Headroom above the tallest bar for its "saved" label and the legend.
    top = 1.2 * max((day.baseline_usd for day in days), default=0.0) or 1.0
    step = (_WIDTH - _LEFT - 10) / max(len(days), 1)
    body = []
    for index, day in enumerate(days):
        x = _LEFT + step * index + step * 0.15
        saved = day.baseline_usd - day.cost_usd
        pct = 100 * saved / day.baseline_usd if day.baseline_usd else 0.0
        for offset, (kind, usd, colour) in enumerate(
            (("baseline", day.baseline_usd, "#bab0ac"), ("billed", day.cost_usd, "#59a14f"))
        ):
            y = _y(usd, top)
            body.append(
                f'<rect x="{x + offset * step * 0.35:.1f}" y="{y:.1f}" width="{step * 0.33:.1f}" '
                f'height="{_HEIGHT - _BOTTOM - y:.1f}" fill="{colour}" data-day="{day.day}" data-kind="{kind}" '
                f'data-usd="{usd:.6f}"><title>{day.day} {kind}: ${usd:.4f}</title></rect>'
            )
        body.append(
            f'<text x="{x + step * 0.35:.1f}" y="{_y(day.baseline_usd, top) - 4:.1f}" text-anchor="middle" '
            f'font-size="11" data-day="{day.day}" data-saved-usd="{saved:.6f}">saved ${saved:.4f} ({pct:.0f}%)</text>'
        )
    legend = [
        f'<rect x="{_LEFT + 10}" y="{_TOP}" width="10" height="10" fill="#bab0ac"/>',
        f'<text x="{_LEFT + 24}" y="{_TOP + 9}" font-size="11">all-realtime no-cache baseline</text>',
        f'<rect x="{_LEFT + 210}" y="{_TOP}" width="10" height="10" fill="#59a14f"/>',
        f'<text x="{_LEFT + 224}" y="{_TOP + 9}" font-size="11">billed</text>',
    ]
    return _frame("Savings against the baseline", "savings", top, "${:.4f}", days, body + legend)


def hit_rate_chart(days: Sequence[Day]) -> str:
    """A line: each day's cache hit rate by tokens (read / (read + written + uncached input))."""
    step = (_WIDTH - _LEFT - 10) / max(len(days), 1)
    points = []
    body = []
    for index, day in enumerate(days):
        rate = day.hit_rate
        if rate is None:
            continue
        x, y = _LEFT + step * (index + 0.5), _y(rate, 1.0)
        points.append(f"{x:.1f},{y:.1f}")
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#4e79a7" data-day="{day.day}" data-rate="{rate:.6f}">'
            f"<title>{day.day}: {rate:.1%} of prompt tokens read from cache</title></circle>"
        )
    if points:
        body.insert(0, f'<polyline points="{" ".join(points)}" fill="none" stroke="#4e79a7" stroke-width="2"/>')
    return _frame("Cache hit rate over time (by tokens)", "hit-rate", 1.0, "{:.0%}", days, body)


def _legend(days: Sequence[Day]) -> str:
    items = [
        f'<span class="key"><i style="background:{_PALETTE[n % len(_PALETTE)]}"></i>{html.escape(name)}</span>'
        for n, name in enumerate(_series(days))
    ]
    return f'<p class="legend">{" ".join(items)}</p>'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 820px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; width: 100%; } td, th { border-bottom: 1px solid #ddd; padding: 4px 8px; }
td.usd, th.usd { text-align: right; white-space: nowrap; }
.legend .key { margin-right: 1em; font-size: 0.85em; } .legend i { display: inline-block; width: 10px;
  height: 10px; margin-right: 4px; }
"""


def html_page(records: Sequence[UsageRecord], recommendations: Sequence[Advice], days_analysed: float) -> str:
    """One self-contained HTML page: the three charts and the recommendations with their dollar figures."""
    days = daily(records)
    spent = sum(r.cost_usd for r in records)
    baseline = sum(r.baseline_usd for r in records)
    rows = "\n".join(
        ("<tr>" if r.usd is None else f'<tr data-usd="{r.usd:.6f}">')
        + f"<td><b>{html.escape(r.title)}</b><br>{html.escape(r.detail)}</td>"
        + f'<td class="usd">{html.escape(r.figure_text())}</td></tr>'
        for r in recommendations
    )
    advice = (
        f'<table id="recommendations"><tr><th>recommendation</th><th class="usd">dollars</th></tr>\n{rows}</table>'
        if recommendations
        else '<p id="recommendations">No recommendation: nothing in the usage log suggests a saving.</p>'
    )
    saved = baseline - spent
    pct = f" ({100 * saved / baseline:.1f}%)" if baseline else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>batch_engine report</title><style>{_STYLE}</style></head>
<body>
<h1>batch_engine report</h1>
<p id="totals" data-requests="{len(records)}" data-spent-usd="{spent:.6f}" data-baseline-usd="{baseline:.6f}">
{len(records)} billed requests over the last {days_analysed:g} days: spent <b>${spent:.4f}</b> against an
all-realtime, no-cache baseline of ${baseline:.4f}, saved <b>${saved:.4f}</b>{pct}.</p>
<h2>Spend per day by route and model</h2>
{spend_chart(days)}
{_legend(days)}
<h2>Savings against the baseline</h2>
{savings_chart(days)}
<h2>Cache hit rate over time</h2>
{hit_rate_chart(days)}
<h2>Recommendations</h2>
{advice}
</body></html>
"""


def _bar(value: float, top: float) -> str:
    cells = round(_BAR_CELLS * value / top) if top else 0
    return "█" * cells or "▏"


def markdown_charts(records: Sequence[UsageRecord], recommendations: Sequence[Advice]) -> str:
    """The same charts for a Prefect Markdown artifact: one table per chart, each value with a text bar."""
    days = daily(records)
    top_spend = max((usd for day in days for usd in day.spend.values()), default=0.0)
    lines = ["## Spend per day by route and model", "", "| day | route / model | spend | |", "|---|---|---:|---|"]
    for day in days:
        for name, usd in sorted(day.spend.items()):
            lines.append(f"| {day.day} | {name} | ${usd:.4f} | `{_bar(usd, top_spend)}` |")
    top_baseline = max((day.baseline_usd for day in days), default=0.0)
    lines += [
        "",
        "## Savings against the baseline",
        "",
        "| day | baseline | billed | saved | |",
        "|---|---:|---:|---:|---|",
    ]
    for day in days:
        saved = day.baseline_usd - day.cost_usd
        lines.append(
            f"| {day.day} | ${day.baseline_usd:.4f} | ${day.cost_usd:.4f} | ${saved:.4f} | "
            f"`{_bar(day.cost_usd, top_baseline)}` of `{_bar(day.baseline_usd, top_baseline)}` |"
        )
    lines += ["", "## Cache hit rate over time (by tokens)", "", "| day | hit rate | |", "|---|---:|---|"]
    for day in days:
        rate = day.hit_rate
        if rate is not None:
            lines.append(f"| {day.day} | {rate:.1%} | `{_bar(rate, 1.0)}` |")
    lines += ["", "## Recommendations", "", "| recommendation | dollars |", "|---|---:|"]
    lines += [f"| **{r.title}**: {r.detail} | {r.figure_text()} |" for r in recommendations] or ["| none | |"]
    return "\n".join(lines) + "\n"

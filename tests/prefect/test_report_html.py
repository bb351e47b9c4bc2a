"""`batch-engine report --html`: one self-contained page whose charts carry the usage log's figures, rendered in a
real headless Chromium (Debian's `chromium`); its screenshot is kept in test-artifacts/."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from batch_engine.cli import main
from batch_engine.state.usage_log import UsageLog, UsageRecord

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
DAY_S = 86_400


def _record(at: float, task: str, route: str, model: str, cost: float, baseline: float, read: int) -> UsageRecord:
    return UsageRecord(
        at=at,
        run_key="r1",
        task_id=task,
        task_type="classify_bulk" if route == "batch" else "user_query",
        route=route,
        model=model,
        status="succeeded",
        input_tokens=100,
        output_tokens=20,
        cache_read_tokens=read,
        cache_write_5m_tokens=0,
        cache_write_1h_tokens=50,
        thinking_tokens=0,
        cost_usd=cost,
        baseline_usd=baseline,
        latency_s=None if route == "batch" else 0.3,
        max_tokens=1024,
        prefix_key=None,
        prefix_tokens=0,
        cache_ttl=None,
        thinking=None,
        route_reason="test",
    )


@pytest.fixture
def usage_log(tmp_path: Path) -> list[UsageRecord]:
    # Three days ending yesterday, at noon UTC (no record near a day boundary), two routes, two models.
    noon = (time.time() // DAY_S) * DAY_S - DAY_S / 2
    records = []
    for day in range(3):
        at = noon - (2 - day) * DAY_S
        for n in range(4 + day):
            records.append(_record(at + n, f"b{day}-{n}", "batch", "claude-haiku-5-5", 0.01, 0.04, 300 * day))
        records.append(_record(at + 9, f"r{day}", "realtime", "claude-sonnet-5-5", 0.05 * (day + 1), 0.06, 0))
    with UsageLog.open(tmp_path / "state") as log:
        log.append(records)
    return records


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "Chromium is needed (Debian: apt-get install -y chromium; .ci/run installs it)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={user_data}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


# Appended to a copy of the page (the page itself has no script): Chromium writes where it drew each bar and
# point into the DOM it dumps, so the test sees the rendered geometry, not only the data the SVG carries.
_MEASURE = """<script>
for (const mark of document.querySelectorAll("svg[data-chart] rect[data-day], svg[data-chart] circle[data-day]")) {
  const box = mark.getBoundingClientRect();
  mark.setAttribute("data-drawn-top", box.top.toFixed(2));
  mark.setAttribute("data-drawn-height", box.height.toFixed(2));
}
</script>"""


def _drawn_to_scale(marks: list[dict[str, str]], value: str) -> None:
    """Every mark is drawn (taller than a pixel), and its drawn height is its `value` on one scale."""
    assert marks and all(float(mark["drawn-height"]) > 1 for mark in marks), marks
    scales = [float(mark["drawn-height"]) / float(mark[value]) for mark in marks]
    assert max(scales) == pytest.approx(min(scales), rel=0.02), scales


def _pixels_per_rate(points: list[dict[str, str]]) -> float:
    """The hit-rate chart's vertical scale, from its lowest and highest points (both drawn)."""
    low, high = points[0], points[-1]
    spread = float(high["rate"]) - float(low["rate"])
    assert spread > 0, "the fixture's days must differ in hit rate"
    return (float(low["drawn-top"]) - float(high["drawn-top"])) / spread


def _attributes(dom: str, tag: str, chart: str) -> list[dict[str, str]]:
    """The data-* attributes of every `tag` element inside the SVG chart `chart` of the dumped DOM."""
    svg = re.search(rf'<svg[^>]*data-chart="{chart}".*?</svg>', dom, re.S)
    assert svg, f"no {chart} chart in the page"
    return [dict(re.findall(r'data-([a-z-]+)="([^"]*)"', match)) for match in re.findall(rf"<{tag}\b[^>]*>", svg[0])]


def test_the_html_report_renders_in_chromium_with_the_usage_logs_figures(
    tmp_path: Path, usage_log: list[UsageRecord]
) -> None:
    page = tmp_path / "report.html"

    args = ["report", "--html", str(page), "--output", str(tmp_path / "report.md"), "--days", "7"]

    assert main([*args, "--state-dir", str(tmp_path / "state")]) == 0

    text = page.read_text()
    # Self-contained: nothing fetched from anywhere (no script, no external stylesheet, font or image).
    assert not re.search(r"<script|<link|<img|@import|https?://(?!www\.w3\.org/2000/svg)", text)
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    shot = _chromium(f"--screenshot={screenshot}", "--window-size=900,1600", page.as_uri(), user_data=tmp_path / "u1")
    measured = tmp_path / "measured.html"
    measured.write_text(text.replace("</body>", f"{_MEASURE}</body>"))
    dumped = _chromium("--dump-dom", measured.as_uri(), user_data=tmp_path / "u2")
    assert shot.returncode == 0 and dumped.returncode == 0, shot.stderr + dumped.stderr
    dom = dumped.stdout
    # A page of charts, not a blank one: a blank 900x1600 PNG is a few KB.
    assert screenshot.stat().st_size > 20_000

    spend: dict[tuple[str, str], float] = defaultdict(float)
    for record in usage_log:
        day = time.strftime("%Y-%m-%d", time.gmtime(record.at))
        spend[(day, f"{record.route} / {record.model}")] += record.cost_usd
    bars = _attributes(dom, "rect", "spend")
    assert {(bar["day"], bar["series"]): pytest.approx(float(bar["usd"])) for bar in bars} == spend
    _drawn_to_scale(bars, "usd")

    days = sorted({day for day, _ in spend})
    savings = [bar for bar in _attributes(dom, "rect", "savings") if "kind" in bar]
    _drawn_to_scale(savings, "usd")
    for day in days:
        of_day = [r for r in usage_log if time.strftime("%Y-%m-%d", time.gmtime(r.at)) == day]
        billed = {bar["kind"]: float(bar["usd"]) for bar in savings if bar["day"] == day}
        assert billed == {
            "baseline": pytest.approx(sum(r.baseline_usd for r in of_day)),
            "billed": pytest.approx(sum(r.cost_usd for r in of_day)),
        }

    points = _attributes(dom, "circle", "hit-rate")
    rates = {point["day"]: float(point["rate"]) for point in points}
    # Drawn where their rate says: a higher rate is higher up (a smaller top), by one scale.
    by_rate = sorted(points, key=lambda point: float(point["rate"]))
    assert all(float(point["drawn-height"]) > 1 for point in points)
    assert _pixels_per_rate(by_rate) > 50  # the plot is 204 px high
    for low, high in itertools.pairwise(by_rate):
        rise = float(low["drawn-top"]) - float(high["drawn-top"])
        assert rise == pytest.approx((float(high["rate"]) - float(low["rate"])) * _pixels_per_rate(by_rate), abs=1)
    for day in days:
        of_day = [r for r in usage_log if time.strftime("%Y-%m-%d", time.gmtime(r.at)) == day]
        read = sum(r.cache_read_tokens for r in of_day)
        assert rates[day] == pytest.approx(read / sum(r.prompt_tokens for r in of_day))

    # The recommendations with their dollar figures (realtime sends of a batch-eligible type, at least).
    figures = re.findall(r'<tr data-usd="([\d.]+)">', dom)
    assert figures and all(float(usd) > 0 for usd in figures)
    assert "$" in dom.split('id="recommendations"', 1)[1]


@pytest.mark.usefixtures("prefect_harness")
def test_the_same_charts_are_a_prefect_markdown_artifact(
    tmp_path: Path, usage_log: list[UsageRecord], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    args = ["report", "--prefect-artifact", "--analyze-only", "--state-dir", str(tmp_path / "state")]

    assert main(args) == 0

    async def latest() -> str:
        async with get_client() as client:
            key = ArtifactFilter(key=ArtifactFilterKey(any_=["batch-engine-report-charts"]))
            [artifact] = await client.read_latest_artifacts(artifact_filter=key)
        return str(artifact.data)

    markdown = asyncio.run(latest())
    assert "published the Prefect artifact batch-engine-report-charts" in capsys.readouterr().out
    for heading in ("Spend per day by route and model", "Savings against the baseline", "Cache hit rate over time"):
        assert f"## {heading}" in markdown
    for record in usage_log:
        if record.route == "realtime":  # one realtime request a day: its row carries exactly its cost
            day = time.strftime("%Y-%m-%d", time.gmtime(record.at))
            assert f"| {day} | realtime / {record.model} | ${record.cost_usd:.4f} |" in markdown
    assert "| **Try the cheap tier for `user_query`**" in markdown

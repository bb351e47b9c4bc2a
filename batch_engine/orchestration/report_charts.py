"""The `batch-engine-report` flow: publishes the usage report's charts as a Prefect Markdown artifact (Prefect keeps
artifacts with the flow run that made them; `batch-engine report --prefect-artifact` runs it)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

CHARTS_ARTIFACT_KEY = "batch-engine-report-charts"


@flow(name="batch-engine-report", description="Publish the usage log's charts as a Markdown artifact.")
def publish_report_charts(markdown: str) -> None:
    """The charts (Markdown from `batch_engine.render.charts.markdown_charts`) under a key that stays the same."""
    create_markdown_artifact(markdown, key=CHARTS_ARTIFACT_KEY, description="batch_engine usage charts")

"""Deployment entrypoint of the `batch-orchestrator` and `batch-collect` flows (prefect.yaml points here).

The flows live in `batch_engine.orchestration.orchestrator`; this file only exposes them to `prefect deploy` and to
`python flows/batch_orchestrator.py`, which serves the `on-demand` deployment from this process (no work pool).
"""

from batch_engine.orchestration.orchestrator import batch_orchestrator, collect

__all__ = ["batch_orchestrator", "collect"]

if __name__ == "__main__":
    batch_orchestrator.serve(name="on-demand", tags=["batch-engine", "on-demand"])

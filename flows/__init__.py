"""Thin Prefect flows over batch_engine: the `batch-orchestrator` flow, its deployments and their entry points."""

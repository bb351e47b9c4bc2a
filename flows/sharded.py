"""Deployment entrypoint of the `batch-sharded` flow (prefect.yaml points here).

The flow lives in `batch_engine.orchestration.sharded`; `python flows/sharded.py` serves its `sharded` deployment
from this process (its shards run as `batch-orchestrator/on-demand` runs, which another process must serve).
"""

from batch_engine.orchestration.sharded import batch_sharded

__all__ = ["batch_sharded"]

if __name__ == "__main__":
    batch_sharded.serve(name="sharded", tags=["batch-engine", "sharded"])

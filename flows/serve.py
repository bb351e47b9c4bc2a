"""Serve every batch_engine deployment from one process, no work pool needed: `python flows/serve.py [--help]`.

The deployments (the same as prefect.yaml's) are built in `batch_engine.orchestration.deployments`.
"""

from batch_engine.orchestration.deployments import main

if __name__ == "__main__":
    main()

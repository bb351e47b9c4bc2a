"""batch_engine: run large volumes of Claude requests cheaply and reliably (Message Batches or realtime).

The public API, for a Python user::

    import asyncio
    import batch_engine

    config = batch_engine.load_config("samples/config.toml")
    summary = asyncio.run(
        batch_engine.run("tasks.jsonl", "results.json", api=batch_engine.api_from_environment(), config=config)
    )

`make_plan(iter_records(path), config, now)` shows what a file would send without sending it; the error tree
is rooted at `BatchEngineError`; the models are the input record, the output rows and the output file.

The names load on first use, so `import batch_engine` (and every `batch_engine.*` import, which runs this
file first) stays cheap: the CLI's quick commands and the emulator never import the SDK or the run loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name → the module that defines it.
_EXPORTS = {
    # running
    "run": "batch_engine.runner",
    "Run": "batch_engine.runner",
    "RunOptions": "batch_engine.runner",
    "ApiSettings": "batch_engine.client",
    "api_from_environment": "batch_engine.client",
    # config and planning
    "Config": "batch_engine.config",
    "load_config": "batch_engine.config",
    "make_plan": "batch_engine.planning",
    "iter_records": "batch_engine.files",
    "RawRecord": "batch_engine.files",
    "Plan": "batch_engine.planning",
    "PlannedTask": "batch_engine.planning",
    "plan_summary": "batch_engine.planning.plan_summary",
    "PlanSummary": "batch_engine.planning.plan_summary",
    # models: the input record, the output rows and the output file
    "TaskRequest": "batch_engine.models",
    "TaskResult": "batch_engine.models",
    "Rejection": "batch_engine.models",
    "Usage": "batch_engine.models",
    "ErrorInfo": "batch_engine.models",
    "RunSummary": "batch_engine.models",
    "RunCounts": "batch_engine.models",
    "BatchSummary": "batch_engine.models",
    "TokenTotals": "batch_engine.models",
    "CostSummary": "batch_engine.models",
    "OutputFile": "batch_engine.models",
    # the error tree
    "BatchEngineError": "batch_engine.errors",
    "InputError": "batch_engine.errors",
    "ConfigError": "batch_engine.errors",
    "BudgetError": "batch_engine.errors",
    "LedgerError": "batch_engine.errors",
    "RunBusyError": "batch_engine.errors",
    "RunChangedError": "batch_engine.errors",
    "ApiError": "batch_engine.errors",
    "TransientApiError": "batch_engine.errors",
    "PermanentApiError": "batch_engine.errors",
    "SpendLimitError": "batch_engine.errors",
}

__all__ = [
    "ApiError",
    "ApiSettings",
    "BatchEngineError",
    "BatchSummary",
    "BudgetError",
    "Config",
    "ConfigError",
    "CostSummary",
    "ErrorInfo",
    "InputError",
    "LedgerError",
    "OutputFile",
    "PermanentApiError",
    "Plan",
    "PlanSummary",
    "PlannedTask",
    "RawRecord",
    "Rejection",
    "Run",
    "RunBusyError",
    "RunChangedError",
    "RunCounts",
    "RunOptions",
    "RunSummary",
    "SpendLimitError",
    "TaskRequest",
    "TaskResult",
    "TokenTotals",
    "TransientApiError",
    "Usage",
    "api_from_environment",
    "iter_records",
    "load_config",
    "make_plan",
    "plan_summary",
    "run",
]

if TYPE_CHECKING:
    from batch_engine.client import ApiSettings, api_from_environment
    from batch_engine.config import Config, load_config
    from batch_engine.errors import (
        ApiError,
        BatchEngineError,
        BudgetError,
        ConfigError,
        InputError,
        LedgerError,
        PermanentApiError,
        RunBusyError,
        RunChangedError,
        SpendLimitError,
        TransientApiError,
    )
    from batch_engine.files import RawRecord, iter_records
    from batch_engine.models import (
        BatchSummary,
        CostSummary,
        ErrorInfo,
        OutputFile,
        Rejection,
        RunCounts,
        RunSummary,
        TaskRequest,
        TaskResult,
        TokenTotals,
        Usage,
    )
    from batch_engine.planning import Plan, PlannedTask, make_plan
    from batch_engine.planning.plan_summary import PlanSummary, plan_summary
    from batch_engine.runner import Run, RunOptions, run


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batch_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

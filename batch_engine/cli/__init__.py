"""The `batch-engine` command, one module per noun: `run`, `plan` (plan, validate, schema), `batches`, `insight`
(cache-stats, report), `emulator`, `bench`. Each command parses, calls the library, renders; `main` turns a
library error into one `Error: ...` line and exit 2."""

from batch_engine.cli.main import main

__all__ = ["main"]

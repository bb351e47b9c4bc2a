"""The `batch-engine` command, one module per noun: `run`, `plan` (plan, validate, schema), `batches`, `insight`
(cache-stats, report), `emulator`, `bench`. Each command parses, calls the library, renders; `main` turns a
library error into one `Error: ...` line and exit 2."""

import gc

# Start-up: the commands' imports (the SDK's ~1,500 pydantic models above all) make a few hundred thousand objects
# that live as long as the process. Collections while they are made walk them again and again (5-10% of the
# import), so the collector waits until they are all made, then they are frozen out of every later walk. The
# first `run` request goes out ~0.1 s sooner (`bench startup`).
_collecting = gc.isenabled()
gc.disable()
try:
    from batch_engine.cli.main import main
finally:
    gc.freeze()
    if _collecting:
        gc.enable()

__all__ = ["main"]

"""Benchmarks and the fault soak: commands that print numbers, outside the library's import graph (nothing in
`batch_engine` imports this package; `batch-engine bench` runs `python -m batch_engine.bench` in a subprocess).

    python -m batch_engine.bench <name> [--help]     plan, batch, cost, realtime, ratelimit, faults, startup, ...
    python -m batch_engine.bench.soak --tasks 10000  the fault soak
    python -m batch_engine.bench.emulator            the emulator's own throughput
"""

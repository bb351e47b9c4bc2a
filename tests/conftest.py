"""Shared fixtures: one emulator server per test session, reset before every test that uses it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batch_engine.emulator import EmulatorSettings, RunningEmulator, start_emulator

# Fast batches by default (a test that needs to watch one in progress configures a longer duration).
SESSION_EMULATOR_SETTINGS = EmulatorSettings(batch_duration_s=0.1)


@pytest.fixture(scope="session")
def _emulator_server() -> Iterator[RunningEmulator]:
    with start_emulator(SESSION_EMULATOR_SETTINGS) as emulator:
        yield emulator


@pytest.fixture
def emulator(_emulator_server: RunningEmulator) -> RunningEmulator:
    """A running emulator with no batches, cache, counters or scripted faults, at the session settings.

    `emulator.configure(...)` changes settings for the current test only; the next test starts from reset.
    """
    _emulator_server.reset()
    return _emulator_server


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API for the whole session (~10 s to start), for tests that run flows or blocks."""
    import os

    from prefect.testing.utilities import prefect_test_harness

    # No internet in CI: without this the temporary server logs a telemetry DNS error on every start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=60):
        yield

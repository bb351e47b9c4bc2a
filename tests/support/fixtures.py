"""The session fixtures, loaded for every test folder by `tests/conftest.py`: one emulator server per test
session, reset before every test that uses it; one Prefect test harness and one migrated Prefect database per
session for the Prefect tests; one real PostgreSQL server per session, a new database per test that asks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_engine.emulator import EmulatorSettings, RunningEmulator, start_emulator
from tests.support.postgres import PostgresServer, running_postgres

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
    # Its server migrates a fresh database first: 80-85 s measured with the 2-core machine at load 11-12, when 60 s
    # failed every Prefect test of the session at setup.
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def migrated_prefect_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Prefect SQLite database with every migration applied (~9 s once); copy it into a test's PREFECT_HOME so
    the servers a test starts skip migrating a fresh database (11-40 s on a busy 2-core machine)."""
    import os
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("prefect-migrated")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    prefect = Path(sys.executable).with_name("prefect")
    subprocess.run(
        [str(prefect), "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True, timeout=120
    )
    return home / "prefect.db"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (fails, never skips, when its binaries are missing)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh state URL of each backend: the SQLite files in a temporary state directory, or a new database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()

"""Loads the shared fixtures (`tests/support/fixtures.py`) for every test folder, and keeps the nightly tests out
of a plain `pytest`."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.support.fixtures"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nightly: long generated-input runs, left out unless selected with -m nightly")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the nightly tests out of a plain `pytest` (CI); `-m nightly` selects them."""
    if "nightly" in (config.getoption("markexpr") or ""):
        return
    nightly = [item for item in items if item.get_closest_marker("nightly")]
    if nightly:
        config.hook.pytest_deselected(items=nightly)
        items[:] = [item for item in items if not item.get_closest_marker("nightly")]

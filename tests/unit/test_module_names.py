"""No module of ours is named after a standard-library module.

A file loaded by its path puts its own folder first on `sys.path`: `flows/secrets.py` made every flow started as
`python flows/serve.py` crash in pydantic's `import secrets` before the flow began (issue 13).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("batch_engine", "flows")


def shadowing_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every module or package under `packages` whose own name is a standard-library module's."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = path.parent.name if path.stem == "__init__" else path.stem
            if name in sys.stdlib_module_names:
                found.append(str(path.relative_to(root)))
    return found


def test_no_module_is_named_after_a_standard_library_module() -> None:
    assert shadowing_modules(ROOT) == []


def test_the_check_finds_a_module_that_shadows_the_standard_library(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "secrets.py").write_text("")
    (tmp_path / "batch_engine" / "json").mkdir(parents=True)
    (tmp_path / "batch_engine" / "json" / "__init__.py").write_text("")
    (tmp_path / "batch_engine" / "api_key.py").write_text("")
    assert shadowing_modules(tmp_path) == ["batch_engine/json/__init__.py", "flows/secrets.py"]

"""Names that mean one thing: no module of ours is named after a standard-library module, and the emulator (which
stands in for Anthropic) names none of its classes after one of the engine's.

A file loaded by its path puts its own folder first on `sys.path`: `flows/secrets.py` made every flow started as
`python flows/serve.py` crash in pydantic's `import secrets` before the flow began (issue 13).
"""

from __future__ import annotations

import ast
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


def shared_class_names(root: Path) -> dict[str, list[str]]:
    """Class names the emulator defines that the engine (batch_engine outside emulator/, or flows/) also defines."""

    def classes(paths: list[Path]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    found.setdefault(node.name, []).append(str(path.relative_to(root)))
        return found

    emulator_dir = root / "batch_engine" / "emulator"
    engine_files = [
        path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if emulator_dir not in path.parents
    ]
    emulator = classes(sorted(emulator_dir.rglob("*.py")))
    engine = classes(engine_files)
    return {name: emulator[name] + engine[name] for name in sorted(emulator.keys() & engine.keys())}


def test_the_emulator_names_no_class_after_an_engine_class() -> None:
    assert shared_class_names(ROOT) == {}


def test_the_check_finds_an_emulator_class_named_after_an_engine_class(tmp_path: Path) -> None:
    (tmp_path / "batch_engine" / "emulator").mkdir(parents=True)
    (tmp_path / "flows").mkdir()
    (tmp_path / "batch_engine" / "emulator" / "billing.py").write_text("class Ledger:\n    pass\n")
    (tmp_path / "batch_engine" / "ledger.py").write_text("class Ledger:\n    pass\n\nclass Run:\n    pass\n")
    assert shared_class_names(tmp_path) == {"Ledger": ["batch_engine/emulator/billing.py", "batch_engine/ledger.py"]}

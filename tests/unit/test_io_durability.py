"""Output files: written with the mode the umask gives any new file, and a temporary file is swept only when
the writer that made it is gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch_engine.files import atomic_write_chunks


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_the_output_gets_the_umasks_mode_not_0600(tmp_path: Path, umask_022: None) -> None:
    out = tmp_path / "out.json"
    atomic_write_chunks(out, [b"{}"])
    assert out.stat().st_mode & 0o777 == 0o644


def _temp(out: Path, pid: int) -> Path:
    host = socket.gethostname().replace(".", "_")
    path = out.parent / f".{out.name}.{host}.{pid}.abc123.tmp"
    path.write_bytes(b"partial")
    return path


def test_only_a_dead_writers_temporary_file_is_swept(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = _temp(out, int(gone.stdout))
    live = _temp(out, os.getpid())  # a writer still at work (this process, as far as the sweep can tell)

    atomic_write_chunks(out, [b"{}"])

    assert not dead.exists()
    assert live.exists()
    assert out.read_bytes() == b"{}"

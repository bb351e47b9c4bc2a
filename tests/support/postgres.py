"""A real PostgreSQL server for the test session: a throwaway cluster (initdb) in a temporary directory, on a free
port of 127.0.0.1 with trust authentication, stopped (`pg_ctl stop -m immediate`) when the session ends.

initdb refuses to run as root, so under root the cluster belongs to the `postgres` user (Debian's package creates
it). Missing binaries fail the tests that need them, with the command that installs them: never a skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install -y postgresql (Debian's package; .ci/run installs it when missing)"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory ($BATCH_ENGINE_TEST_PG_BIN overrides)."""
    override = os.environ.get("BATCH_ENGINE_TEST_PG_BIN")
    candidates = [override] if override else sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major, reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    pytest.fail(f"no PostgreSQL server binaries (initdb) under /usr/lib/postgresql/*/bin: {INSTALL_HINT}")


def _major(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        return self.url(name)


def _as_owner(command: list[str]) -> list[str]:
    # initdb and postgres refuse root; run them as the package's `postgres` user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a throwaway cluster; stop it and delete its files on exit."""
    binaries = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="batch-engine-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()
    log = root / "server.log"
    started = False
    try:
        subprocess.run(
            _as_owner([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=on -c max_connections=200"
        done = subprocess.run(
            _as_owner(
                [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
            ),
            capture_output=True,
            text=True,
            timeout=90,
        )
        started = True
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"PostgreSQL did not start: {done.stdout}{done.stderr}\n{tail}")
        yield PostgresServer("127.0.0.1", port, "postgres")
    finally:
        if started:
            subprocess.run(
                _as_owner([str(binaries / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate", "-w"]),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)

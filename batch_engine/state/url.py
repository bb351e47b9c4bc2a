"""Where the run ledger and the usage log live: a state URL, `sqlite:///<directory>` (the default: the two SQLite
files in the state directory) or `postgresql://user@host/db` (one database shared by every worker)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from batch_engine.errors import ConfigError

ENV_STATE_URL = "BATCH_ENGINE_STATE_URL"

# `postgresql+asyncpg://...` is what Prefect's own database URL looks like: the same server, our driver.
_POSTGRES = re.compile(r"^postgres(?:ql)?(?:\+[a-z0-9_]+)?://", re.IGNORECASE)
_SQLITE = "sqlite:///"
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


@dataclass(frozen=True, slots=True)
class StateUrl:
    """A parsed state URL: which backend, and where."""

    kind: Literal["sqlite", "postgresql"]
    directory: Path | None  # sqlite: the directory holding ledger.sqlite3 and usage.sqlite3
    dsn: str | None  # postgresql: the libpq connection URL (never logged: it may carry a password)

    @property
    def shown(self) -> str:
        """The URL as it may be printed: the password left out."""
        if self.dsn is not None:
            return redact(self.dsn)
        return f"{_SQLITE}{self.directory}"


def redact(url: str) -> str:
    """`url` with any password replaced by `***`."""
    return _PASSWORD.sub(r"\1***@", url)


def parse_state_url(url: str) -> StateUrl:
    """A `StateUrl` from its text; ConfigError naming the (redacted) value when it is neither form."""
    if _POSTGRES.match(url):
        return StateUrl("postgresql", None, _POSTGRES.sub("postgresql://", url, count=1))
    if url.startswith(_SQLITE) and len(url) > len(_SQLITE):
        return StateUrl("sqlite", Path(url[len(_SQLITE) :]), None)
    raise ConfigError(
        f"state_url {redact(url)!r}: expected sqlite:///<state directory> or postgresql://user@host/database"
    )


def resolve_state_url(explicit: str | None, state_dir: Path, configured: str | None = None) -> StateUrl:
    """The state URL a command uses: `--state-url`, else $BATCH_ENGINE_STATE_URL, else the config's `state_url`,
    else the SQLite files in `state_dir`."""
    url = explicit or os.environ.get(ENV_STATE_URL) or configured
    return parse_state_url(url) if url else StateUrl("sqlite", Path(state_dir), None)

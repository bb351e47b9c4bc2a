"""The parser of every command and the boundary where a library error becomes one `Error: ...` line."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from batch_engine.cli import batches, bench, emulator, insight, plan, run
from batch_engine.errors import BatchEngineError

_DESCRIPTION = (
    "The `batch-engine` command: thin commands over the library; library errors become one `Error: ...` line."
)
Command = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one `Error:` line and exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {self.prog}: {message} (see {self.prog} --help)\n")


@functools.cache  # built once per process (argparse spends most of a small command's time building it)
def _build_parser() -> argparse.ArgumentParser:
    # Typed as the base class so the add_* helpers take it; its subparsers are _Parser too (argparse uses type(self)).
    parser: argparse.ArgumentParser = _Parser(prog="batch-engine", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    # Each add_* function registers one noun/verb and sets `func`; keep them in this order.
    for noun in (plan, emulator, run, batches, insight, bench):
        noun.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 1 when some tasks failed, 2 on bad input/config."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except BatchEngineError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130

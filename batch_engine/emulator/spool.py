"""The result lines of one batch, spooled to an unnamed temporary file so a batch's memory does not grow with
its rows: a million-row job leaves ~600 MB of results in the emulator, which only ever reads them back whole."""

from __future__ import annotations

import random
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from typing import IO

SPOOL_BUFFER_BYTES = 1 << 16


class ResultSpool:
    """JSONL lines appended as rows are answered, read back in the (shuffled) order results are served in."""

    def __init__(self, lines: Iterable[bytes] = ()) -> None:
        self._file: IO[bytes] | None = None
        self._ends = array("q")
        self._order: array[int] | None = None
        for line in lines:
            self.append(line)

    def __len__(self) -> int:
        return len(self._ends)

    def append(self, line: bytes) -> None:
        if self._file is None:
            # Unlinked at once on POSIX: the space returns to the disk when the spool is dropped or closed.
            # A 64 KiB buffer: a write call per ~60 lines instead of per ~8 (half the CPU of an append).
            self._file = tempfile.TemporaryFile(prefix="emulator_results_", buffering=SPOOL_BUFFER_BYTES)  # noqa: SIM115 (lives as long as the batch)
        self._file.write(line)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(line))

    def shuffle(self, rng: random.Random) -> None:
        """Put the lines in the order `rng.shuffle` would put a list of them in."""
        order = list(range(len(self._ends)))
        rng.shuffle(order)
        self._order = array("q", order)

    def lines(self) -> Iterator[bytes]:
        """Every line, in the current order."""
        if self._file is None:
            return
        self._file.flush()
        self._file.seek(0)
        data = self._file.read()
        self._file.seek(0, 2)
        ends = self._ends
        for index in self._order if self._order is not None else range(len(ends)):
            yield data[ends[index - 1] if index else 0 : ends[index]]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        # A batch forgotten by a reset is never closed explicitly; its file must not outlive it.
        self.close()

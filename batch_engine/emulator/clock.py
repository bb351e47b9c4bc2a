"""The emulator's own clock: wall time at start, then running `time_scale` times faster, and jumpable."""

from __future__ import annotations

import time


class ScaledClock:
    """Emulated epoch seconds. With time_scale=3600 an hour of batch time or cache TTL passes in a second."""

    def __init__(self, time_scale: float = 1.0, start: float | None = None) -> None:
        self._scale = time_scale
        self._real0 = time.monotonic()
        self._emu0 = time.time() if start is None else start

    @property
    def time_scale(self) -> float:
        return self._scale

    def now(self) -> float:
        return self._emu0 + (time.monotonic() - self._real0) * self._scale

    def set_scale(self, time_scale: float) -> None:
        """Change the speed from now on without jumping."""
        self._emu0 = self.now()
        self._real0 = time.monotonic()
        self._scale = time_scale

    def advance(self, seconds: float) -> None:
        """Jump forward (never back: batch timestamps must stay ordered)."""
        self._emu0 += max(0.0, seconds)

    def real_seconds(self, emulated_seconds: float) -> float:
        """How long a client waits in wall time for `emulated_seconds` to pass."""
        return emulated_seconds / self._scale

"""A progress bar on stderr (redrawn in place on a terminal, a line per phase otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts ``total`` steps; :meth:`step` advances and shows what runs now."""

    def __init__(self, total: int, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = enabled and hasattr(self._stream, "isatty") and self._stream.isatty()
        self._phase = ""
        self._t0 = time.monotonic()

    def phase(self, name: str) -> None:
        """A new phase starts (printed as its own line when stderr is not a terminal)."""
        self._phase = name
        if self._enabled and not self._tty:
            self._stream.write(f"[bench {self._percent():3d}%] {name}\n")
            self._stream.flush()
        self._draw("")

    def step(self, what: str = "", n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw(what)

    def _percent(self) -> int:
        return int(100 * self.done / self.total)

    def _draw(self, what: str) -> None:
        if not self._tty:
            return
        width = 28
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self._t0
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {self._percent():3d}% {elapsed:5.0f}s {self._phase}: {what}"
        self._stream.write(line[:118].ljust(118))
        self._stream.flush()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\r" + " " * 118 + "\r")
            self._stream.flush()
        elif self._enabled:
            self._stream.write(f"[bench 100%] done in {time.monotonic() - self._t0:.0f} s\n")
            self._stream.flush()

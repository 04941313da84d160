"""A one-line progress bar on stderr for the `push` and `get` commands."""

import shutil
import sys
import time
from typing import Optional, TextIO

from fedstream.common.sizes import format_size

_REDRAW_INTERVAL = 0.1  # seconds between redraws


class Progress:
    """Progress of a transfer of `total_bytes`; draws nothing unless `enabled` (e.g. stderr is a TTY)."""

    def __init__(self, total_bytes: int, label: str, enabled: bool, stream: Optional[TextIO] = None) -> None:
        self.total = max(0, int(total_bytes))
        self.label = label
        self.enabled = enabled
        self.done = 0
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._closed = False

    def update(self, n: int) -> None:
        """Count `n` more bytes as transferred."""
        self.done = min(self.total, self.done + max(0, n)) if self.total else self.done + max(0, n)
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= _REDRAW_INTERVAL:
            self._last_draw = now
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, now: float) -> None:
        fraction = self.done / self.total if self.total else 1.0
        rate = self.done / max(now - self._started, 1e-6) / 1e6
        tail = f" {100 * fraction:3.0f}% {format_size(self.done)} / {format_size(self.total)} {rate:6.0f} MB/s"
        width = shutil.get_terminal_size((80, 20)).columns
        label = self.label if len(self.label) <= 24 else self.label[:21] + "..."
        bar_width = max(10, width - len(label) - len(tail) - 4)
        filled = int(bar_width * fraction)
        self._stream.write(f"\r{label} [{'#' * filled}{'.' * (bar_width - filled)}]{tail}")
        self._stream.flush()

"""A plain-text progress bar on stderr while a run goes on.

On a terminal the bar is redrawn in place twice a second; in a log (stderr not a terminal) a
line is printed every ten seconds instead. ``close`` prints the final state and a newline.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

_WIDTH = 30


class Progress:
    """Counts of one run, updated by the runner, drawn by ``run``."""

    def __init__(self, total: int, span_s: float, label: str = "bench", out: TextIO | None = None):
        self.total = total  # requests in the run
        self.span_s = span_s  # scheduled span of the run
        self.label = label
        self.out = out or sys.stderr
        self.num_sent = 0
        self.num_done = 0
        self.num_failed = 0
        self.is_tty = self.out.isatty()
        self._t0 = time.perf_counter()

    def line(self) -> str:
        frac = self.num_done / self.total if self.total else 1.0
        bar = "#" * int(frac * _WIDTH) + "." * (_WIDTH - int(frac * _WIDTH))
        elapsed = time.perf_counter() - self._t0
        return (
            f"{self.label} [{bar}] {frac:4.0%}  sent {self.num_sent}/{self.total}  "
            f"done {self.num_done}  failed {self.num_failed}  "
            f"{elapsed:.0f}/{self.span_s:.0f} s"
        )

    async def run(self) -> None:
        """Draw until cancelled."""
        period = 0.5 if self.is_tty else 10.0
        while True:
            await asyncio.sleep(period)
            self._draw()

    def close(self) -> None:
        self._draw()
        if self.is_tty:
            self.out.write("\n")
        self.out.flush()

    def _draw(self) -> None:
        if self.is_tty:
            self.out.write("\r" + self.line())
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

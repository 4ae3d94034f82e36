"""Progress on stderr for the batch clients: a tqdm bar (rate, ETA) on a terminal, and a plain line
every ``interval`` seconds otherwise, so a log file gets a readable history instead of a flood of
carriage returns. Both use tqdm's own meter text."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class ProgressDisplay:
    def __init__(self, desc: str, total: int | None = None, unit: str = "it", stream: TextIO | None = None,
                 interval: float = 10.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.n, self.postfix = 0, ""
        tty = self.stream.isatty() if tty is None else tty
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True) if tty else None
        self._started = self._last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.n += count
        if self._bar is not None:
            self._bar.update(count)
        elif time.monotonic() - self._last >= self.interval:
            self._line()

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _line(self) -> None:
        self._last = time.monotonic()
        meter = tqdm.format_meter(self.n, self.total, self._last - self._started, prefix=self.desc, unit=self.unit,
                                  ncols=0)
        self.stream.write(meter + (f" {self.postfix}" if self.postfix else "") + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

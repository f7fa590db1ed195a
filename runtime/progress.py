"""Progress for long work: a tqdm bar on a terminal, plain lines in logs (CI, ``| tee``).

Without a terminal on stderr, :class:`LineProgress` prints ``DESCRIPTION: N/TOTAL (P%) k=v ...``
on stderr every :data:`LINE_EVERY_S` seconds or every 10% of the total, whichever comes first,
and a last line on close.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LINE_EVERY_S = 5.0
_LINE_FRACTION = 0.1


class LineProgress:
    """The part of tqdm's interface adasr uses, printing lines (see the module docstring)."""

    def __init__(self, total: int | None, description: str, unit: str = "step",
                 stream: TextIO | None = None) -> None:
        self.total = total or None
        self.desc = description
        self.unit = unit
        self.n = 0
        self._stream = stream or sys.stderr
        self._postfix = ""
        self._last_n = 0
        self._last_t = self._start = time.monotonic()
        self._closed = False

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self._postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        step = self.total * _LINE_FRACTION if self.total else None
        if now - self._last_t >= LINE_EVERY_S or (step and self.n - self._last_n >= step):
            self._line(now)

    def _line(self, now: float) -> None:
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total \
            else f"{self.n}"
        rate = self.n / (now - self._start) if now > self._start else 0.0
        print(f"{self.desc}: {done} {self.unit}s, {rate:.1f} {self.unit}/s"
              + (f", {self._postfix}" if self._postfix else ""), file=self._stream, flush=True)
        self._last_n, self._last_t = self.n, now

    def close(self) -> None:
        if not self._closed and self.n != self._last_n:
            self._line(time.monotonic())
        self._closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Silent(LineProgress):
    def _line(self, now: float) -> None:
        pass


def progress_bar(total: int | None, description: str, *, quiet: bool = False,
                 unit: str = "step") -> Any:
    """A tqdm bar when stderr is a terminal, else :class:`LineProgress`; silent with ``quiet``."""
    if quiet:
        return _Silent(total, description, unit)
    if not sys.stderr.isatty():
        return LineProgress(total, description, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)


def quiet_progress(quiet: bool) -> Any:
    """A ``progress(total, description)`` factory for library calls (silent with ``quiet``)."""
    return lambda total, description: progress_bar(total, description, quiet=quiet)

"""Reading untrusted JSON into typed records: every failure is one line naming the field.

A reader wraps the parsed JSON in a :class:`Field` (its value and its path, e.g.
``engines[1].onnx.path``) and asks it for what it expects: ``f["tile"].integer(8, 4096)``,
``f["method"].choice(METHODS)``, ``f["layers"].items()``. Anything else -- a missing key, a wrong
type, a NaN, a number out of its range, a ``null`` where an object belongs -- raises the reader's
error class (an :class:`~runtime.errors.AdasrError` subclass) with the message
``"<what> field <path>: expected <what is allowed>, got <what was found>"``. Readers built on it
are total: any JSON value gives either a validated record or that error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import NoReturn

from runtime.errors import AdasrError, unknown_name

__all__ = ["Field", "describe", "root_field"]

_SHOWN = 60  # characters of a bad value quoted in a message


def describe(value: object) -> str:
    """A short, one-line description of a JSON value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "an object"
    text = repr(value)
    if isinstance(value, list | tuple) and (len(text) > _SHOWN or not all(
            _is_number(v) for v in value)):
        return f"a list of {len(value)}"
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Field:
    """One value of a JSON document being read, with its path and the reader's error class."""

    value: object
    path: str
    what: str  # the document, e.g. "manifest" or "calibration record"
    error: type[AdasrError]

    @property
    def where(self) -> str:
        """``<what> field <path>`` (just ``<what>`` at the top of the document)."""
        return f"{self.what} field {self.path}" if self.path else self.what

    def fail(self, expected: str) -> NoReturn:
        """Raise the reader's error: ``<what> field <path>: expected ..., got ...``."""
        raise self.error(f"{self.where}: expected {expected}, got {describe(self.value)}")

    def problem(self, text: str) -> NoReturn:
        """Raise the reader's error with a free-form reason: ``<what> field <path>: <text>``."""
        raise self.error(f"{self.where}: {text}")

    def _child(self, value: object, key: str | int) -> Field:
        path = f"{self.path}[{key}]" if isinstance(key, int) else (
            f"{self.path}.{key}" if self.path else key)
        return Field(value, path, self.what, self.error)

    # ---------------------------------------------------------------- containers

    def obj(self) -> Mapping[str, object]:
        if not isinstance(self.value, Mapping):
            self.fail("an object")
        return self.value

    def __getitem__(self, key: str) -> Field:
        """The member ``key`` of this object (the error names it when it is missing)."""
        data = self.obj()
        if key not in data:
            self._child(None, key).problem("missing")
        return self._child(data[key], key)

    def get(self, key: str) -> Field | None:
        """The member ``key``, or None when it is absent or null."""
        data = self.obj()
        value = data.get(key)
        return None if value is None else self._child(value, key)

    def items(self, min_len: int = 0, max_len: int = 1 << 20) -> list[Field]:
        """The elements of this list, ``min_len``..``max_len`` of them."""
        if not isinstance(self.value, list | tuple):
            self.fail("a list")
        if not min_len <= len(self.value) <= max_len:
            self.fail(f"a list of {min_len}..{max_len} items")
        return [self._child(v, i) for i, v in enumerate(self.value)]

    def members(self) -> list[tuple[str, Field]]:
        """The (key, member) pairs of this object."""
        return [(str(k), self._child(v, str(k))) for k, v in self.obj().items()]

    # ---------------------------------------------------------------- scalars

    def integer(self, lo: int, hi: int) -> int:
        """An integer in ``lo..hi`` (an integral JSON float such as ``8.0`` counts)."""
        v = self.value
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
            return v
        self.fail(f"an integer in {lo}..{hi}")

    def number(self, lo: float = -math.inf, hi: float = math.inf, *,
               infinite: bool = False) -> float:
        """A finite number in ``lo..hi`` (``infinite``: or +-inf, as a PSNR may be; never NaN)."""
        v = self.value
        if isinstance(v, int | float) and not isinstance(v, bool):
            try:
                number = float(v)
            except OverflowError:
                number = math.inf
            if (infinite or math.isfinite(number)) and lo <= number <= hi:
                return number
        bounds = "" if (lo, hi) == (-math.inf, math.inf) else f" in {lo:g}..{hi:g}"
        self.fail(f"a {'' if infinite else 'finite '}number{bounds}")

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            self.fail("true or false")
        return self.value

    def text(self, max_len: int = 4096, *, lines: bool = False) -> str:
        """A string of at most ``max_len`` characters, without control characters (``lines``:
        newlines and tabs allowed), so that a message quoting it stays one line."""
        v = self.value
        if not isinstance(v, str) or len(v) > max_len or any(
                (ord(c) < 32 and not (lines and c in "\n\t")) or ord(c) == 127 for c in v):
            self.fail(f"a string of at most {max_len} characters"
                      + ("" if lines else " without control characters"))
        return v

    def choice(self, allowed: Collection[str]) -> str:
        """One of ``allowed`` (unknown names get a did-you-mean suggestion)."""
        text = self.text(256)
        if text not in allowed:
            self.problem(unknown_name(self.path.rsplit(".", 1)[-1] or "value", text, allowed))
        return text

    def check(self, expected_of: Callable[[str], str | None]) -> str:
        """A string that ``expected_of`` accepts: it returns None, or what is expected instead."""
        value = self.text(1024)
        expected = expected_of(value)
        if expected is not None:
            self.fail(expected)
        return value


def root_field(data: object, what: str, error: type[AdasrError]) -> Field:
    """The top of a JSON document ``what`` (e.g. ``"manifest"``) read with ``error``."""
    return Field(data, "", what, error)

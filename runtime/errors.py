"""The one exception hierarchy of adasr.

Every user-facing failure raises a subclass of :class:`AdasrError` whose message says what was
wrong, the value given and what is allowed (with a close-match suggestion for names). The CLI
prints ``error: <message>`` on one line and exits with status 2 for any of these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdasrError(Exception):
    """Base class of every error adasr reports to a user."""


class CheckpointError(AdasrError):
    """A weights file is missing, unreadable, truncated or matches no known architecture."""


class DatasetError(AdasrError):
    """A benchmark or calibration folder is missing, empty or malformed."""


class ConfigError(AdasrError):
    """An option, target file or record field has a value that is not allowed."""


class CalibrationError(AdasrError):
    """Calibration could not produce a usable quantized network."""


class BundleError(AdasrError):
    """A bundle is missing files, fails its checksums or was built for another device."""


class EngineError(AdasrError):
    """An engine could not be built, loaded or run."""


class MediaError(AdasrError):
    """An input image or video is unreadable, corrupt or of an unsupported format."""


def did_you_mean(given: str, allowed: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest allowed name, or '' if none is close."""
    close = difflib.get_close_matches(given, list(allowed), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(kind: str, given: str, allowed: Iterable[str]) -> str:
    """Format the standard message for an unknown name: kind, value, suggestion, allowed list."""
    names = sorted(allowed)
    return f"unknown {kind} {given!r}{did_you_mean(given, names)}; allowed: {', '.join(names)}"


class OutputError(AdasrError):
    """An output cannot be written: it is an input or another output, it exists (without
    ``--force``), something is in the way, its folder is read-only or the disk is full."""


def check_range(option: str, value: float, low: float, high: float) -> None:
    """ConfigError ``"{option} must be in LOW..HIGH, got VALUE"`` unless low <= value <= high."""
    if not low <= value <= high:  # also refuses NaN
        raise ConfigError(f"{option} must be in {low}..{high}, got {value}")

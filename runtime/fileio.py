"""Atomic writes: a crash never leaves a half-written file that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename it over ``path``.

    The temp name is new (``mkstemp``), so it never collides with a file; an OS failure (read-only
    folder, disk full, ``ulimit -f``, a file in the way) is a one-line OutputError and leaves no
    temp file."""
    from runtime.errors import OutputError
    from runtime.outputs import deferred_signals, one_line_os_error

    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with deferred_signals(reraise=False):
                Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {path}: {one_line_os_error(err)}") from err
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())


def read_bundle_json(path: Path, what: str, missing: str) -> Any:
    """The JSON at ``path`` (a bundle's manifest or profile); one-line :class:`BundleError`s:
    ``"{what}{path} {missing}"`` when it is missing, ``"cannot read {what}{path}: ..."`` when it
    is unreadable (``what`` is e.g. ``"the profile "``)."""
    from runtime.errors import BundleError

    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise BundleError(f"{what}{path} {missing}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"cannot read {what}{path}: {err}") from err


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

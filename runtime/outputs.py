"""The output-path guard: no write of a command touches an input, another output or a file the
tool did not create.

Every command that writes declares its inputs and claims each output with :meth:`Outputs.claim`
*before* any long work. A claim is refused (one-line :class:`OutputError`) when the output is the
same file as an input or as another output (compared through symlinks and hard links: resolved
paths, and device + inode where the file exists), when a folder or a non-folder is in the way,
when its folder cannot be written (probed with a real temp file), and when the file exists and
``--force`` was not given.

Partial results (an interrupted video) get a name that is new: :func:`place_new` links the
finished temp file to ``NAME.partial.EXT``, or ``NAME.partial-2.EXT`` ... when that exists, so
an existing file is never replaced or deleted. :func:`deferred_signals` holds Ctrl-C, SIGTERM and
SIGHUP while cleanup runs, so a second signal cannot leave temp files behind.

Folders a command owns (a bundle, quickstart's output) carry a marker file (:func:`mark_folder`);
only a marked folder is ever replaced whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType

from runtime.errors import OutputError

__all__ = ["FORCE_HINT", "INTERRUPT_SIGNALS", "Outputs", "deferred_signals", "is_marked",
           "mark_folder", "marker_path", "one_line_os_error", "place_new", "probe_writable",
           "same_file"]

FORCE_HINT = "give --force to overwrite it, or choose another name"
INTERRUPT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_MAX_TRIES = 1000


Key = tuple[object, ...]


def _keys(path: Path) -> set[Key]:
    """What identifies a file: its resolved path and, when it exists, device + inode."""
    keys: set[Key] = {("path", str(path.resolve()))}
    try:
        info = path.stat()  # follows symlinks
    except OSError:
        return keys
    keys.add(("inode", info.st_dev, info.st_ino))
    return keys


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: same resolved path, or same device and inode
    (symlinks and hard links)."""
    return bool(_keys(a) & _keys(b))


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def one_line_os_error(err: OSError) -> str:
    """``strerror`` of an OS error (``File too large``, ``Read-only file system`` ...)."""
    if err.strerror:
        return err.strerror
    return os.strerror(err.errno) if err.errno else str(err) or type(err).__name__


def probe_writable(path: Path, what: str) -> None:
    """Refuse (one line) when no file can be created beside ``path``: the nearest existing
    folder is read-only, or a non-folder stands where a folder is needed."""
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    try:
        handle, name = tempfile.mkstemp(prefix=".adasr-probe-", dir=parent)
    except OSError as err:
        raise OutputError(f"cannot write {what} {path}: folder {parent} is not writable "
                          f"({one_line_os_error(err)})") from err
    os.close(handle)
    os.unlink(name)


class Outputs:
    """The inputs of one command and the outputs it has claimed so far."""

    def __init__(self, inputs: Iterable[Path], force: bool = False) -> None:
        self.force = force
        self._inputs: dict[Key, Path] = {key: Path(p) for p in inputs for key in _keys(Path(p))}
        self._claimed: dict[Key, tuple[Path, str]] = {}
        self._writable: set[Path] = set()  # folders probed already

    def claim(self, path: Path, what: str, *, replace: bool = False) -> Path:
        """Check the output file ``path`` of option ``what`` (``-o`` ...); see the module
        docstring. ``replace``: an existing file may be replaced even without ``--force`` (the
        command's own output of an earlier run)."""
        path = Path(path)
        keys = _keys(path)
        source = next((self._inputs[key] for key in keys if key in self._inputs), None)
        if source is not None:
            same = "" if path.absolute() == source.absolute() else f" (the same file as {source})"
            raise OutputError(f"{what} {path} is an input{same}: choose another name")
        other = next((self._claimed[key] for key in keys if key in self._claimed), None)
        if other is not None:
            raise OutputError(f"{what} {path} is also the {other[1]} output: choose another "
                              "name")
        if path.is_dir():
            raise OutputError(f"{what} {path} is a folder, not a file: choose another name")
        if (path.exists() or path.is_symlink()) and not (self.force or replace):
            raise OutputError(f"{what} {path} exists: {FORCE_HINT}")
        if path.absolute().parent not in self._writable:
            probe_writable(path, what)
            self._writable.add(path.absolute().parent)
        self._claimed.update((key, (path, what)) for key in keys)
        return path


def place_new(temp: Path, wanted: Path) -> Path:
    """Move the finished file ``temp`` to ``wanted``, or to ``STEM-2.EXT``, ``STEM-3.EXT`` ...
    when that name exists: never replaces a file. Returns where it went."""
    for index in range(1, _MAX_TRIES + 1):
        candidate = wanted if index == 1 else wanted.with_name(
            f"{wanted.stem}-{index}{wanted.suffix}")
        try:
            os.link(temp, candidate)  # fails when candidate exists: no check-then-write race
        except FileExistsError:
            continue
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                raise
            if candidate.exists() or candidate.is_symlink():  # no hard links on this disk
                continue
            os.replace(temp, candidate)
            return candidate
        os.unlink(temp)
        return candidate
    raise OutputError(f"no free name for {wanted} after {_MAX_TRIES} tries")


@contextlib.contextmanager
def deferred_signals(*, reraise: bool = True) -> Iterator[list[int]]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while cleanup runs (the main thread only; a no-op
    elsewhere). The signals received are in the yielded list; with ``reraise`` (and no exception
    leaving the block) one received is raised as KeyboardInterrupt on exit, else dropped: the
    caller is already unwinding an error or an interrupt."""
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {}
    try:
        for sig in INTERRUPT_SIGNALS:
            previous[sig] = signal.signal(sig, hold)
    except ValueError:  # not the main thread: signals are delivered there anyway
        pass
    unwinding = False
    try:
        yield received
    except BaseException:
        unwinding = True
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received and reraise and not unwinding:
            raise KeyboardInterrupt


def marker_path(folder: Path) -> Path:
    return folder / ".adasr"


def mark_folder(folder: Path, kind: str) -> None:
    """Write the marker saying ``folder`` was written by adasr as a ``kind`` (e.g. the bundle
    schema ``adasr.bundle/1``)."""
    from runtime.fileio import atomic_write_bytes

    atomic_write_bytes(marker_path(folder), f"{kind}\n".encode())


def is_marked(folder: Path, kind: str) -> bool:
    """Whether ``folder`` (a real folder, not a symlink) carries the marker of ``kind``."""
    marker = marker_path(folder)
    if folder.is_symlink() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return marker.read_text().strip() == kind
    except (OSError, UnicodeDecodeError):
        return False

"""A bundle is closed: every file it names lies inside it, reached without a symbolic link.

The manifest names files by relative path (engines, plans, the calibration record, the profile).
:func:`relpath_problem` is the one rule for such a path (relative, normalized, POSIX separators,
no ``..``), checked when a manifest is read or made; :func:`bundle_path` is the one way to turn
it into a path under the bundle folder, refusing a symbolic link at any component (``lstat``), so
nothing outside the bundle is ever opened, hashed or written through a manifest. Engine names
become file names (``engines/<name>.<key>.plan``), so they keep to :data:`ENGINE_NAME`'s
alphabet (:func:`engine_name_problem`); so does the target's name, which ``build --finish`` looks
up as ``targets/<name>.toml`` (:func:`target_name_problem`).

Engine graphs must be single ONNX files: ONNX Runtime and TensorRT's parser load *external
data* from paths stored inside the graph, which no checksum of the manifest covers.
:func:`external_data_tensors` finds such tensors by reading the protobuf wire format directly (the
device side imports no ``onnx``), and :func:`check_single_file_onnx` refuses them.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import BundleError

__all__ = [
    "ENGINE_NAME", "TARGET_NAME", "bundle_path", "check_single_file_onnx", "engine_name_problem",
    "external_data_tensors", "relpath_problem", "target_name_problem",
]

ENGINE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
ENGINE_NAME_RULE = ("an engine name of 1..64 characters a-z 0-9 _ . - starting with a letter or "
                    "digit, without '..'")
TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
TARGET_NAME_RULE = "a target name of 1..64 characters a-z 0-9 - (e.g. 'jetson-orin-nano')"
RELPATH_RULE = ("a relative path inside the bundle ('/'-separated, no '..', '.', empty parts, "
                "leading '/', backslash, ':' or control characters)")
MAX_RELPATH = 512


def engine_name_problem(name: str) -> str | None:
    """None when ``name`` is a safe engine name, else the rule it breaks."""
    if ENGINE_NAME.fullmatch(name) and ".." not in name:
        return None
    return ENGINE_NAME_RULE


def target_name_problem(name: str) -> str | None:
    """None when ``name`` can name a shipped target (``build --finish`` loads
    ``targets/<name>.toml``; a path there would load any file), else the rule it breaks."""
    return None if TARGET_NAME.fullmatch(name) else TARGET_NAME_RULE


def relpath_problem(path: str) -> str | None:
    """None when ``path`` is a normalized relative path that stays inside its folder, else the
    rule it breaks (checked on the text alone: symbolic links are :func:`bundle_path`'s job)."""
    parts = path.split("/")
    if (not path or len(path) > MAX_RELPATH or "\\" in path or ":" in path
            or any(ord(c) < 32 or ord(c) == 127 for c in path)
            or any(part in ("", ".", "..") for part in parts)):
        return RELPATH_RULE
    return None


def bundle_path(root: Path, relpath: str, what: str) -> Path:
    """``root / relpath`` after checking ``relpath`` (:func:`relpath_problem`) and that no
    component below ``root`` is a symbolic link; BundleError naming ``what`` otherwise. A missing
    component is fine here (the caller reports a missing file or creates it)."""
    problem = relpath_problem(relpath)
    if problem is not None:
        raise BundleError(f"{what}: path {relpath!r} of bundle {root} is refused: expected "
                          f"{problem}")
    path = root
    for part in relpath.split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return root.joinpath(relpath)
        except OSError as err:
            raise BundleError(f"{what}: cannot read {relpath} in bundle {root}: "
                              f"{err.strerror or err}") from err
        if stat.S_ISLNK(mode):
            inside = path.relative_to(root).as_posix()
            raise BundleError(f"{what}: {inside} is a symbolic link (bundle {root}); a bundle "
                              "is closed (its files are regular files inside it): rebuild the "
                              "bundle")
    return path


# ---------------------------------------------------------------- ONNX external data

# Field numbers of onnx.proto (a test checks them against the onnx package).
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE = 5
FUNCTION_NODE = 7
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE, ATTR_SPARSES = 5, 6, 10, 11, 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one protobuf message: ints for varints, views for the
    length-delimited; fixed-width fields are skipped."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == _LENGTH:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise _Malformed("truncated field")
            yield number, buf[pos:pos + size]
            pos += size
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise _Malformed(f"wire type {wire}")


def _messages(buf: memoryview, *numbers: int) -> Iterator[tuple[int, memoryview]]:
    for number, value in _fields(buf):
        if number in numbers and isinstance(value, memoryview):
            yield number, value


def _tensor_external(buf: memoryview) -> str | None:
    """The tensor's name when it keeps its data outside the file, else None."""
    name, external = "", False
    for number, value in _fields(buf):
        if number == TENSOR_NAME and isinstance(value, memoryview):
            name = bytes(value).decode("utf-8", "replace")
        elif number == TENSOR_EXTERNAL_DATA or (number == TENSOR_DATA_LOCATION
                                                and value == EXTERNAL):
            external = True
    return (name or "<unnamed>") if external else None


def _sparse_external(buf: memoryview) -> Iterator[str]:
    for _, tensor in _messages(buf, SPARSE_VALUES, SPARSE_INDICES):
        name = _tensor_external(tensor)
        if name is not None:
            yield name


def _nodes_external(nodes: Iterator[memoryview]) -> Iterator[str]:
    for node in nodes:
        for _, attr in _messages(node, NODE_ATTRIBUTE):
            for number, value in _messages(attr, ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS,
                                           ATTR_SPARSE, ATTR_SPARSES):
                if number in (ATTR_T, ATTR_TENSORS):
                    name = _tensor_external(value)
                    if name is not None:
                        yield name
                elif number in (ATTR_SPARSE, ATTR_SPARSES):
                    yield from _sparse_external(value)
                else:
                    yield from _graph_external(value)


def _graph_external(buf: memoryview) -> Iterator[str]:
    for number, value in _messages(buf, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER):
        if number == GRAPH_INITIALIZER:
            name = _tensor_external(value)
            if name is not None:
                yield name
        else:
            yield from _sparse_external(value)
    yield from _nodes_external(v for _, v in _messages(buf, GRAPH_NODE))


def external_data_tensors(model: bytes) -> list[str]:
    """Names of the tensors of a serialized ONNX model that keep their data in external files
    (graph, subgraphs and functions); ValueError when the bytes are not a valid protobuf."""
    buf = memoryview(model)
    found: list[str] = []
    for number, value in _messages(buf, MODEL_GRAPH, MODEL_FUNCTIONS):
        if number == MODEL_GRAPH:
            found += _graph_external(value)
        else:
            found += _nodes_external(v for _, v in _messages(value, FUNCTION_NODE))
    return found


def check_single_file_onnx(path: Path, what: str) -> None:
    """BundleError when the ONNX graph at ``path`` refers to external data (or is no protobuf)."""
    try:
        names = external_data_tensors(path.read_bytes())
    except _Malformed as err:
        raise BundleError(f"{what}: {path.name} is not a valid ONNX file ({err}); rebuild the "
                          "bundle") from err
    except OSError as err:
        raise BundleError(f"{what}: cannot read {path.name}: {err.strerror or err}") from err
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise BundleError(f"{what}: {path.name} keeps tensors in external data files ({shown}); "
                          "bundle engines must be single ONNX files (no checksum covers "
                          "external data): rebuild the bundle")

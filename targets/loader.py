"""Device targets: load, validate and detect the ``targets/*.toml`` data files.

A target says what a device really runs (backend, TensorRT versions, kernel precisions, ONNX
opset, tile defaults) and how to recognise it. Every rule a target file must obey is
checked here, in :func:`_target_from_table`, so the compiler can trust a :class:`Target`.

Only the standard library and :mod:`runtime.errors` are imported: this module runs on a device
without torch, onnx or TensorRT. GPU detection calls ``nvidia-smi``; it never imports a GPU
library.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, cast, get_args

from runtime.backends import BACKENDS as BACKENDS
from runtime.backends import DEVICE_RULES, RuntimeBackend, runtime_backend
from runtime.errors import ConfigError, did_you_mean, unknown_name
from runtime.manifest import MIN_OPSET
from runtime.manifest import PRECISIONS as PRECISIONS
from runtime.manifest import DeviceMatch as DeviceMatch
from runtime.manifest import Precision as Precision

Backend = str  # a name of runtime.backends.BACKENDS
GpuArch = Literal["volta", "turing", "ampere", "ada", "hopper", "blackwell"]

GPU_ARCHS: tuple[str, ...] = get_args(GpuArch)

TARGETS_DIR = Path(__file__).resolve().parent
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
NVIDIA_SMI_TIMEOUT_S = 10.0

# Hardware facts (deployment.md): FP8 tensor cores from Ada/Hopper on, FP4 from Blackwell on.
_FP8_ARCHS = frozenset({"ada", "hopper", "blackwell"})
_FP4_ARCHS = frozenset({"blackwell"})

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")

_TOP_KEYS: dict[str, str] = {
    "name": "target name (the file's stem)",
    "description": "one line for humans",
    "backend": "the default backend (runtime.backends.BACKENDS)",
    "backends": "other backends the device runs (adasr build --backend), same device kind",
    "tensorrt": "TensorRT version range {min, max} (tensorrt backend only)",
    "gpu_arch": "GPU architecture (tensorrt backend only)",
    "max_opset": "highest ONNX opset the backend parses",
    "default_tile": "LR tile size in pixels",
    "default_overlap": "tile overlap in LR pixels",
    "threads": "intra-op threads, 0 = the backend's default (CPU backends only)",
    "precision_ladder": "kernel precisions the device runs (over its backends), cheapest first",
    "top_precision": "most precise kernel precision (the ladder's last rung)",
    "device_match": "how detect_target() recognises the machine",
}
_TENSORRT_KEYS = ("min", "max")
_MATCH_KEYS = ("machine", "jetson_model", "gpu_name")


@dataclass(frozen=True)
class TensorRTRange:
    """TensorRT versions a target runs, both ends inclusive and prefix-matched.

    ``minimum=(10, 3), maximum=(11,)`` accepts 10.3.0 ... 11.99: a version is compared on as
    many components as each bound has.
    """

    minimum: tuple[int, ...]
    maximum: tuple[int, ...]

    def contains(self, version: str) -> bool:
        """Whether a TensorRT version string (``trt.__version__``, e.g. '10.3.0.30') fits."""
        parts = _parse_version(version)
        return parts[: len(self.minimum)] >= self.minimum and (
            parts[: len(self.maximum)] <= self.maximum
        )

    def __str__(self) -> str:
        low, high = _join(self.minimum), _join(self.maximum)
        return f"{low}.x" if low == high else f"{low}-{high}.x"


@dataclass(frozen=True)
class Target:
    """One device as the compiler sees it. Build with :func:`load_target`, never by hand."""

    name: str
    description: str
    backend: Backend
    tensorrt: TensorRTRange | None
    gpu_arch: GpuArch | None
    max_opset: int
    default_tile: int
    default_overlap: int
    threads: int | None
    precision_ladder: tuple[Precision, ...]
    top_precision: Precision
    device_match: DeviceMatch = field(default_factory=DeviceMatch)
    source: Path | None = field(default=None, compare=False)
    backends: tuple[str, ...] = ()  # every backend the device runs bundles with, default first
    device_ladder: tuple[Precision, ...] = ()  # the device's rungs over all its backends

    def supports(self, precision: str) -> bool:
        """Whether the device runs kernels of this precision (with the chosen backend)."""
        return precision in self.precision_ladder

    def with_backend(self, name: str) -> Target:
        """This target built for another of its backends (``adasr build --backend``): the
        ladder keeps the device's rungs that backend runs."""
        if name == self.backend:
            return self
        if name not in self.backends:
            raise ConfigError(unknown_name(f"backend of target {self.name!r}", name,
                                           self.backends))
        return replace(self, backend=name,
                       precision_ladder=_backend_ladder(self.device_ladder, name))


@dataclass(frozen=True)
class DeviceFacts:
    """What :func:`probe_device` saw on this machine."""

    machine: str
    jetson_model: str | None = None
    gpu_name: str | None = None

    def describe(self) -> str:
        parts = [f"machine {self.machine or '?'}"]
        parts.append(f"Jetson model {self.jetson_model!r}" if self.jetson_model else "no Jetson")
        parts.append(f"GPU {self.gpu_name!r}" if self.gpu_name else "no NVIDIA GPU")
        return ", ".join(parts)


# ---------------------------------------------------------------- loading


def load_target(name_or_path: str | Path) -> Target:
    """A shipped target by name (``jetson-orin-nano``) or a target file (``./my-board.toml``).

    A ``Path``, or a string with a path separator or a ``.toml`` suffix, is a file; anything
    else is a name of a file in ``targets/``.
    """
    if isinstance(name_or_path, Path) or _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"target file not found: {path}")
        return _load_file(path)
    name = name_or_path
    path = TARGETS_DIR / f"{name}.toml"
    if not _NAME.match(name) or not path.is_file():
        known = _shipped_names()
        raise ConfigError(f"{unknown_name('target', name, known)} (or give a path to a .toml file)")
    return _load_file(path)


def list_targets() -> list[Target]:
    """Every shipped target, CPU targets first, then by name."""
    found = [_load_file(TARGETS_DIR / f"{name}.toml") for name in _shipped_names()]
    return sorted(found, key=lambda t: (runtime_backend(t.backend).device != "cpu", t.name))


def _shipped_names() -> list[str]:
    return sorted(path.stem for path in TARGETS_DIR.glob("*.toml"))


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or (sys.platform == "win32" and "\\" in text)


def _load_file(path: Path) -> Target:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read target file {path}: {err.strerror or err}") from err
    return _target_from_table(_parse_toml(text, path), path)


def _parse_toml(text: str, path: Path) -> dict[str, object]:
    # Python >= 3.11 has tomllib; on 3.10 the identical third-party tomli is needed.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised only on Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            raise ConfigError(
                "reading target files on Python 3.10 needs the 'tomli' package "
                "(pip install tomli), or use Python >= 3.11"
            ) from err
    try:
        return dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


# ---------------------------------------------------------------- validation (the one place)


class _Table:
    """Typed reads from one TOML table, with messages that name the file and the key."""

    def __init__(self, data: Mapping[str, object], path: Path, section: str = "") -> None:
        self.data = data
        self.path = path
        self.section = section

    def where(self, key: str) -> str:
        return f"{self.path}: {self.section + '.' if self.section else ''}{key}"

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)} {message}")

    def reject_unknown(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in self.data:
            if key not in allowed:
                kind = f"key in [{self.section}]" if self.section else "key"
                raise ConfigError(f"{self.path}: {unknown_name(kind, key, allowed)}")

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str) -> object:
        if key not in self.data:
            raise ConfigError(f"{self.path}: missing required key {key!r}"
                              + (f" in [{self.section}]" if self.section else ""))
        return self.data[key]

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, key: str, allowed: Sequence[str]) -> str:
        value = self.string(key)
        if value not in allowed:
            label = f"{self.section}.{key}" if self.section else key
            raise ConfigError(f"{self.path}: {unknown_name(label, value, allowed)}")
        return value

    def integer(self, key: str, minimum: int) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def strings(self, key: str, allow_empty: bool = True) -> tuple[str, ...]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of non-empty strings, got {value!r}")
        if not value and not allow_empty:
            raise self.fail(key, "must not be empty")
        return tuple(cast(list[str], value))

    def table(self, key: str) -> _Table:
        value = self._get(key)
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {value!r}")
        return _Table(cast(dict[str, object], value), self.path, key)

    def absent(self, key: str, reason: str) -> None:
        if key in self.data:
            raise self.fail(key, f"is not allowed: {reason}")


def _target_from_table(data: Mapping[str, object], path: Path) -> Target:
    t = _Table(data, path)
    t.reject_unknown(_TOP_KEYS)

    name = t.string("name")
    if not _NAME.match(name):
        raise t.fail("name", f"must be lowercase letters, digits and '-', got {name!r}")
    if name != path.stem:
        raise t.fail("name", f"is {name!r} but the file is {path.name!r}: they must agree")
    description = t.string("description")
    backend = t.choice("backend", BACKENDS)

    max_opset = t.integer("max_opset", MIN_OPSET)
    tile = t.integer("default_tile", 16)
    overlap = t.integer("default_overlap", 0)
    if 2 * overlap >= tile:
        raise t.fail("default_overlap", f"is {overlap}: twice the overlap must be smaller "
                     f"than default_tile ({tile})")

    ladder = _precision_ladder(t)
    top = t.choice("top_precision", PRECISIONS)
    if top != ladder[-1]:
        raise t.fail("top_precision", f"is {top!r} but the ladder's most precise rung is "
                     f"{ladder[-1]!r}: they must agree")

    backends = _backends(t, backend)
    tensorrt: TensorRTRange | None = None
    gpu_arch: GpuArch | None = None
    threads: int | None = None
    if backends[0].threads:  # CPU backends
        label = " / ".join(b.label for b in backends)
        for key in ("tensorrt", "gpu_arch"):
            t.absent(key, f"only GPU targets have it ({label} runs on the CPU)")
        threads = t.integer("threads", 0)
    else:
        t.absent("threads", "it sets CPU intra-op threads; GPU targets run on the GPU")
        tensorrt = _tensorrt_range(t.table("tensorrt"))
        gpu_arch = cast(GpuArch, t.choice("gpu_arch", GPU_ARCHS))
        _check_tensorrt_rules(t, tensorrt, gpu_arch, ladder)

    _check_ladder(t, backends, ladder)
    match = _device_match(t, backends[0]) if t.has("device_match") else DeviceMatch()
    return Target(
        name=name, description=description, backend=backend, tensorrt=tensorrt,
        gpu_arch=gpu_arch, max_opset=max_opset, default_tile=tile, default_overlap=overlap,
        threads=threads, precision_ladder=_backend_ladder(ladder, backend),
        top_precision=ladder[-1], device_match=match, source=path,
        backends=tuple(b.name for b in backends), device_ladder=ladder,
    )


def _backends(t: _Table, default: str) -> tuple[RuntimeBackend, ...]:
    """The target's backends, its default first, all of one device kind."""
    names = [default]
    for name in t.strings("backends"):
        if name not in BACKENDS:
            raise t.fail("backends", f"has {unknown_name('backend', name, BACKENDS)}")
        if name not in names:
            names.append(name)
    backends = tuple(runtime_backend(name) for name in names)
    if len({b.device for b in backends}) != 1:
        raise t.fail("backends", f"mixes CPU and GPU backends: {names}")
    return backends


def _check_ladder(t: _Table, backends: tuple[RuntimeBackend, ...],
                  ladder: tuple[Precision, ...]) -> None:
    """Every rung of the device's ladder runs on one of its backends, its top (the reference
    engine) on each."""
    for p in ladder:
        if not any(p in b.precisions for b in backends):
            raise t.fail("precision_ladder", f"has {p!r}: no backend of this target "
                         f"({', '.join(b.label for b in backends)}) has {p} kernels")
    for b in backends:
        if ladder[-1] not in b.precisions:
            raise t.fail("top_precision", f"is {ladder[-1]!r}: {b.label} has no such kernels")


def _backend_ladder(ladder: tuple[Precision, ...], backend: str) -> tuple[Precision, ...]:
    """The rungs of the device's ladder that ``backend`` runs."""
    return tuple(p for p in ladder if p in runtime_backend(backend).precisions)


def _precision_ladder(t: _Table) -> tuple[Precision, ...]:
    ladder = t.strings("precision_ladder", allow_empty=False)
    for p in ladder:
        if p not in PRECISIONS:
            raise t.fail("precision_ladder", f"has {unknown_name('precision', p, PRECISIONS)}")
    if len(set(ladder)) != len(ladder):
        raise t.fail("precision_ladder", f"repeats a precision: {list(ladder)}")
    ordered = sorted(ladder, key=PRECISIONS.index)
    if list(ladder) != ordered:
        raise t.fail("precision_ladder", f"must be cheapest first: {ordered}, got {list(ladder)}")
    return cast(tuple[Precision, ...], ladder)


def _tensorrt_range(t: _Table) -> TensorRTRange:
    t.reject_unknown(_TENSORRT_KEYS)
    bounds = []
    for key in _TENSORRT_KEYS:
        text = t.string(key)
        if not _VERSION.match(text):
            raise t.fail(key, f"must be a version like '10.3', got {text!r}")
        bounds.append(_parse_version(text))
    low, high = bounds
    if high[: len(low)] < low[: len(high)]:
        raise t.fail("max", f"{_join(high)} is below min {_join(low)}")
    return TensorRTRange(minimum=low, maximum=high)


def _check_tensorrt_rules(t: _Table, trt: TensorRTRange, arch: str,
                          ladder: tuple[str, ...]) -> None:
    if trt.minimum[0] < 10:
        raise t.fail("tensorrt", f"is {trt}: adasr builds strongly typed networks with TensorRT "
                     ">= 10 only (JetPack 6+; JetPack 5's TensorRT 8.5 and Python 3.8 are not "
                     "supported): set min >= 10")
    if "fp8" in ladder and arch not in _FP8_ARCHS:
        raise t.fail("precision_ladder", f"has 'fp8' but gpu_arch {arch!r} has no FP8 kernels "
                     f"(needs {', '.join(sorted(_FP8_ARCHS))})")
    if "fp4" in ladder and arch not in _FP4_ARCHS:
        raise t.fail("precision_ladder", f"has 'fp4' but gpu_arch {arch!r} has no FP4 kernels "
                     "(needs blackwell)")


def _device_match(t: _Table, backend: RuntimeBackend) -> DeviceMatch:
    m = t.table("device_match")
    m.reject_unknown(_MATCH_KEYS)
    match = DeviceMatch(machine=m.strings("machine"), jetson_model=m.strings("jetson_model"),
                        gpu_name=m.strings("gpu_name"))
    rules = DEVICE_RULES[backend.device]
    for key in _MATCH_KEYS:
        if getattr(match, key) and key not in rules:
            raise m.fail(key, f"is for {'GPU' if key != 'machine' else 'CPU'} targets; "
                         f"{backend.device.upper()} targets match on "
                         f"{' or '.join(repr(r) for r in rules)}")
    return match


def _parse_version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.strip().split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    if not parts:
        raise ConfigError(f"not a version number: {text!r}")
    return tuple(parts)


def _join(parts: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in parts)


# ---------------------------------------------------------------- detection


def probe_device() -> DeviceFacts:
    """Look at this machine: CPU architecture, Jetson model string, first NVIDIA GPU's name."""
    return DeviceFacts(machine=platform.machine(), jetson_model=_read_jetson_model(),
                       gpu_name=_query_gpu_name())


def match_target(facts: DeviceFacts, candidates: Sequence[Target] | None = None) -> Target:
    """The target for these facts: Jetson model first, then the GPU, then the CPU architecture.

    Among substring rules the longest matching pattern wins. A Jetson or GPU that no target
    names falls back to its CPU target (ONNX Runtime runs everywhere).
    """
    targets = list_targets() if candidates is None else list(candidates)
    for seen, rule in ((facts.jetson_model, "jetson_model"), (facts.gpu_name, "gpu_name")):
        if seen:
            best = _best_substring_match(seen, targets, rule)
            if best is not None:
                return best
    machine = facts.machine.lower()
    for target in targets:
        if machine in (m.lower() for m in target.device_match.machine):
            return target
    known = sorted({m for t in targets for m in t.device_match.machine})
    raise ConfigError(f"no target matches this machine ({facts.describe()})"
                      f"{did_you_mean(facts.machine, known)}; CPU targets match "
                      f"{', '.join(known) or 'nothing'}: name a target or a target file")


def detect_target() -> Target:
    """The shipped target of the machine this runs on (``cpu-x86`` on a plain x86-64 PC)."""
    return match_target(probe_device())


def _best_substring_match(seen: str, targets: Sequence[Target], rule: str) -> Target | None:
    text = seen.lower()
    best: tuple[int, Target] | None = None
    for target in targets:
        patterns: tuple[str, ...] = getattr(target.device_match, rule)
        for pattern in patterns:
            if pattern.lower() in text and (best is None or len(pattern) > best[0]):
                best = (len(pattern), target)
    return best[1] if best else None


def _read_jetson_model() -> str | None:
    try:
        raw = DEVICE_TREE_MODEL.read_bytes()
    except OSError:
        return None
    model = raw.replace(b"\x00", b"").decode("utf-8", "replace").strip()
    return model or None


def _query_gpu_name() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return names[0] if names else None

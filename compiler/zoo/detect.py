"""Load a checkpoint and recognise its architecture, configuration and scale from its keys and
shapes alone: ``load_model(path, scale=None)``.

The checkpoint is read with ``torch.load(weights_only=True)`` (no code runs), unwrapped from the
usual containers (``{"state_dict": ...}``, ``{"model": ...}``, ``{"params": ...}``,
``{"params_ema": ...}``, preferred over ``params`` with a note; a DataParallel ``module.``
prefix), checked (floating-point, finite), matched against every architecture
of the zoo, and loaded with ``strict=True``: a state dict that fits no architecture exactly is an
error naming the closest one, never a network with silently random layers.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import torch
from torch import Tensor

from compiler.zoo import carn, edsr, imdn, rdn, rfdn, srresnet
from compiler.zoo.base import LoadedModel, ModelInfo
from compiler.zoo.common import ArchSpec, Detected, StateDict
from runtime.errors import CheckpointError

SPECS: tuple[ArchSpec, ...] = (edsr.SPEC, srresnet.SPEC, rdn.SPEC, carn.CARN_SPEC,
                               carn.CARN_M_SPEC, imdn.SPEC, rfdn.SPEC)
ARCHS = tuple(spec.arch for spec in SPECS)

WRAPPER_KEYS = ("state_dict", "model", "params", "params_ema")
"""Keys under which training frameworks nest the state dict (EDSR-style, BasicSR, Lightning)."""

_LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, OSError, KeyError, ValueError,
                IndexError)
"""What ``torch.load`` raises on a file that is no (intact) checkpoint: a bad zip directory or an
unexpected EOF (RuntimeError), a bad pickle opcode or a refused global (UnpicklingError), a bad
legacy magic number (KeyError), an empty file (EOFError), an unreadable file (OSError)."""


def load_model(path: str | Path, scale: int | None = None) -> LoadedModel:
    """Load a super-resolution checkpoint as a float32 network in eval mode on the CPU.

    ``scale`` must be given for a multi-scale checkpoint and, when given, must be one the
    checkpoint has. Every failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    sd = load_state_dict_file(path)
    spec, det = _identify(sd, path)
    chosen = _choose_scale(det, scale, path)
    try:
        model = spec.load(sd, det, chosen)
    except RuntimeError as err:  # keys match, shapes do not
        raise CheckpointError(
            f"{path.name}: the keys are those of {det.arch} ({_describe(det)}) but the shapes "
            f"differ: {_first_mismatch(err)}") from err
    model.float().eval()
    info = ModelInfo(det.arch, chosen, det.config, _sha256(path), path)
    return LoadedModel(model, info)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped and without a ``module.`` prefix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(path, err)}"
                              ) from err
    return _unwrap(obj, path)


# ------------------------------------------------------------------------------------ reading


def _why_unreadable(path: Path, err: BaseException) -> str:
    with path.open("rb") as f:
        head = f.read(512)
    message = (str(err).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")[:150]
    if not head:
        return "the file is empty"
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        if _is_text(head):
            return "it is a text file, not a PyTorch checkpoint"
        return "not a PyTorch checkpoint (no zip or pickle header)"
    if isinstance(err, EOFError) or any(
            s in message for s in ("unexpected EOF", "central directory", "Invalid argument")):
        return f"the file is truncated or corrupt ({message})"
    if isinstance(err, pickle.UnpicklingError) and "Weights only" in message:
        return "it holds Python objects other than tensors, which weights_only loading refuses"
    return f"the file is corrupt ({type(err).__name__}: {message})"


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        if key == "params" and isinstance(obj.get("params_ema"), dict):
            key = "params_ema"  # BasicSR: the EMA weights are the ones evaluated and released
            print(f"note: {path.name} holds both params and params_ema; loading params_ema",
                  file=sys.stderr)
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path.name}: holds no state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if len(tensors) != len(obj):
        others = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
        raise CheckpointError(f"{path.name}: holds no state dict: non-tensor entries "
                              f"{_few(others)} (wrappers understood: {', '.join(WRAPPER_KEYS)})")
    while all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    _check_values(tensors, path)
    return tensors


def _check_values(tensors: dict[str, Tensor], path: Path) -> None:
    """Refuse weights that are not real floating point (int64, bool, complex: a network would
    silently run on casts) and non-finite values; BatchNorm's step counter is an integer."""
    wrong = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in tensors.items()
             if not v.is_floating_point() and not k.endswith("num_batches_tracked")]
    if wrong:
        raise CheckpointError(f"{path.name}: tensors of a non-floating dtype: {_few(wrong)}; "
                              "weights must be float16/bfloat16/float32/float64")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(
        torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path.name}: the checkpoint has non-finite values (NaN or inf) "
                              f"in {_few(bad)}: it is damaged or from a diverged training run")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -------------------------------------------------------------------------------- recognising


def _identify(sd: StateDict, path: Path) -> tuple[ArchSpec, Detected]:
    keys = set(sd)
    references: list[tuple[ArchSpec, Detected, set[str]]] = []
    for spec in SPECS:
        try:
            det = spec.detect(sd)
        except (KeyError, ValueError, IndexError):  # the signature is there, the rest is not
            det = None
        if det is not None:
            expected = spec.expected_keys(det)
            if expected == keys:
                return spec, det
            references.append((spec, det, expected))
    # No exact match: measure the state dict against the detected and the official configs.
    references += [(spec, spec.default(), spec.expected_keys(spec.default()))
                   for spec in SPECS if spec.arch not in {ref[1].arch for ref in references}]

    def overlap(ref: tuple[ArchSpec, Detected, set[str]]) -> float:
        return len(ref[2] & keys) / len(ref[2] | keys)

    spec, det, expected = max(references, key=overlap)
    if not expected & keys:
        raise CheckpointError(
            f"{path.name}: the state dict matches no known architecture "
            f"({', '.join(ARCHS)}); it has keys {_few(sorted(keys))}")
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    raise CheckpointError(
        f"{path.name}: the state dict matches no known architecture; closest is {det.arch} "
        f"({_describe(det)}, {overlap((spec, det, expected)):.0%} of keys shared): "
        f"missing keys {_few(missing)}; unexpected keys {_few(unexpected)}")


def _choose_scale(det: Detected, scale: int | None, path: Path) -> int:
    have = ", ".join(f"x{s}" for s in det.scales)
    if scale is None:
        if len(det.scales) == 1:
            return det.scales[0]
        raise CheckpointError(f"{path.name} is a multi-scale {det.arch} checkpoint ({have}); "
                              "give the scale to use")
    if scale not in det.scales:
        raise CheckpointError(f"{path.name}: scale x{scale} is not available; this {det.arch} "
                              f"checkpoint has {have}")
    return scale


def _describe(det: Detected) -> str:
    return ", ".join(f"{k}={v}" for k, v in det.config)


def _few(items: list[str], n: int = 4) -> str:
    if not items:
        return "(none)"
    shown = ", ".join(items[:n])
    return shown if len(items) <= n else f"{shown} (+{len(items) - n} more)"


def _first_mismatch(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "size mismatch" in line), lines[-1] if lines else "")
    return detail.rstrip(".")[:200]

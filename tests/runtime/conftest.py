"""Shared runtime fixtures: manifests built in code and a real on-disk bundle of tiny ONNX engines.

``make_manifest`` builds a valid :class:`Manifest` for any engine names (dummy file refs), so
dispatcher and policy tests need no files. ``tiny_bundle`` writes a real bundle folder whose
engines are ONNX graphs upscaling by nearest neighbour plus a per-engine constant bias (so an
output pixel reveals which engine made it), with real sha256 checksums: ``open_bundle`` and the
ONNX Runtime engine load it like a compiled one.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from runtime.fileio import atomic_write_bytes, sha256_file
from runtime.manifest import (
    BuildInfo,
    CalibrationInfo,
    DeviceMatch,
    EngineSpec,
    FileRef,
    LayerPlan,
    Manifest,
    ModelInfo,
    write_manifest,
)

SCALE = 2
TILE = 16
OVERLAP = 4
# name -> (offsets served, fab, bias the fake engine adds); the last one is the reference.
ENGINES: dict[str, tuple[tuple[int, ...], float, float]] = {
    "a4": ((-1,), 4.0, 0.0),
    "a6": ((0, 1), 6.0, 1 / 255),
    "fp32": ((), 32.0, 2 / 255),
}


def _ref(path: str, root: Path | None = None) -> FileRef:
    if root is None:
        return FileRef(path, "0" * 64, 0)
    file = root / path
    return FileRef(path, sha256_file(file), file.stat().st_size)


def make_manifest(engines: Mapping[str, tuple[tuple[int, ...], float]] | None = None, *,
                  tile: int = TILE, overlap: int = OVERLAP, scale: int = SCALE,
                  thresholds: tuple[float, float] = (10.0, 40.0), root: Path | None = None,
                  backend: str = "onnxruntime", machine: Sequence[str] = (),
                  profile: str | None = None) -> Manifest:
    """A valid manifest; ``engines`` maps name -> (offsets, fab); the last is the reference.

    With ``root``, file refs are the real ``engines/<name>.onnx`` and ``calibration.json`` there.
    """
    engines = engines or {k: (v[0], v[1]) for k, v in ENGINES.items()}
    names = list(engines)
    specs = tuple(
        EngineSpec(
            name=name, backend=backend, onnx=_ref(f"engines/{name}.onnx", root), plan=None,
            precision="fp32" if i == len(names) - 1 else "int8", offsets=offsets,
            reference=i == len(names) - 1, fab=fab,
            layers=(LayerPlan("body.0", "fp32" if fab >= 32 else "int8",
                              None if fab >= 32 else int(fab), None if fab >= 32 else 8),),
            input_shape=(-1, 3, -1, -1))
        for i, (name, (offsets, fab)) in enumerate(engines.items()))
    return Manifest(
        model=ModelInfo("tiny", "FAKE", scale, "0" * 64), target="cpu-x86", backend=backend,
        ladder="emulate", tile=tile, overlap=overlap, threads=1, thresholds=thresholds,
        engines=specs,
        calibration=CalibrationInfo(_ref("calibration.json", root), "adabm", 8, 6, False),
        build=BuildInfo(adasr="0.1.0", created="2026-01-01T00:00:00Z", opset=17,
                        onnxruntime="test", device=platform.machine()),
        device_match=DeviceMatch(machine=tuple(machine)), profile=profile)


def nearest_onnx(scale: int, bias: float) -> bytes:
    """An ONNX model: N x 3 x H x W float -> nearest-neighbour upscale by ``scale``, plus bias."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Resize", ["lr", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Add", ["up", "bias"], ["sr"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales"),
        numpy_helper.from_array(np.array(bias, np.float32), "bias"),
    ]
    graph = helper.make_graph(
        nodes, "nearest",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["n", 3, "sh", "sw"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_tiny_bundle(root: Path) -> Path:
    """Write the tiny bundle (ONNX Runtime engines a4 / a6 / fp32, see ENGINES) at ``root``."""
    for name, (_, _, bias) in ENGINES.items():
        atomic_write_bytes(root / "engines" / f"{name}.onnx", nearest_onnx(SCALE, bias))
    atomic_write_bytes(root / "calibration.json", b'{"schema": "adasr.calibration/1"}\n')
    write_manifest(root, make_manifest(root=root, machine=(platform.machine(),)))
    return root


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A real bundle folder (ONNX Runtime engines a4 / a6 / fp32, see ENGINES) in tmp_path."""
    return write_tiny_bundle(tmp_path / "tiny-cpu-x86")

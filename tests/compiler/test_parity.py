"""ONNX Runtime engines against ``compiler.parity.simulate_engine``: the same numbers, bit for bit.

A tiny random IMDN x2 (16 features, 2 blocks: channel split, concat, contrast-aware attention,
LeakyReLU, 1x1 convs, pixel shuffle) is calibrated in a few steps and built with both ladders.
Quantized networks amplify rounding differences: one level flipped next to a rounding tie moves
~9 x C sums of the next conv, some of which flip in turn, so an engine and a simulation that
round differently anywhere (FP32 partial sums of a conv, an FP32 ReduceMean, a sigmoid) drift
apart layer after layer (IMDN x4 on Set5: 37-45 dB). The lowering makes the engine's arithmetic
exact where it can (integer accumulation, FP64 statistics) and the simulation models the rest
(QLinearConv's requantization), so the two agree exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from compiler.bundle import write_bundle
from compiler.lower.export import conv_nodes
from compiler.lower.qdq import lowering_summary
from compiler.parity import simulate_engine
from compiler.plan import plan_engines
from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.patches import sample_patches
from compiler.quant.qmodel import QuantSettings
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from compiler.zoo.imdn import IMDN, CCALayer
from runtime.bundle import open_bundle
from runtime.engines.onnxruntime import session_options
from runtime.imaging import to_uint8
from targets.loader import load_target

FAST = CalibrationConfig(patches=8, patch_size=16, steps=20, batch=2, epochs=4, validation=4)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_imdn(root: Path, calib: Path) -> tuple[Path, dict[str, Any]]:
    """A random tiny IMDN x2 checkpoint in ``root`` and its AdaBM W8A6 FQ record."""
    torch.manual_seed(0)
    weights = root / "imdn_tiny.pth"
    torch.save(IMDN(scale=2, nf=16, num_modules=2).state_dict(), weights)
    settings = QuantSettings(method="adabm", wbits=8, abits=6, fq=True)
    return weights, calibrate(load_model(weights), settings, FAST, calib).record


@pytest.fixture(scope="module")
def imdn(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Path, dict[str, Any], dict[str, Path]]:
    """Weights, AdaBM W8A6 FQ record and the cpu-x86 bundle of each ladder of a tiny IMDN."""
    _, calib = tiny
    root = tmp_path_factory.mktemp("imdn")
    weights, record = tiny_imdn(root, calib)
    patches = sample_patches(calib, 4, 16, seed=0).numpy()
    bundles = {}
    for ladder in ("hardware", "emulate"):
        plan = plan_engines(record, load_target("cpu-x86"), ladder, tile=16, overlap=4)
        bundles[ladder] = root / ladder
        write_bundle(load_model(weights), record, plan, bundles[ladder], patches=patches)
    return weights, record, bundles


def _images() -> list[np.ndarray]:
    """LR test images (uint8 HxWx3): smooth with noise, and pure noise."""
    rng = np.random.default_rng(5)
    smooth = np.kron(rng.random((6, 6, 3)), np.ones((8, 8, 1)))
    noisy = np.clip(smooth + 0.3 * rng.random((48, 48, 3)), 0, 1)
    return [np.round(image * 255).astype(np.uint8) for image in (noisy, rng.random((40, 56, 3)))]


@pytest.mark.parametrize("ladder", ["hardware", "emulate"])
def test_every_engine_is_bit_exact_with_its_simulation(
        imdn: tuple[Path, dict[str, Any], dict[str, Path]], ladder: str) -> None:
    weights, record, bundles = imdn
    bundle = open_bundle(bundles[ladder])
    for spec in bundle.manifest.engines:
        if spec.reference:
            continue
        summary = lowering_summary(onnx.load(bundles[ladder] / spec.onnx.path))
        sim = TorchUpscaler(simulate_engine(weights, record, spec, summary=summary), 2)
        with bundle.engine(spec.name, threads=1) as engine:
            for image in _images():
                x = (image.transpose(2, 0, 1)[None] / 255).astype(np.float32)
                out = to_uint8(engine.infer(x)[0].transpose(1, 2, 0))
                ref = to_uint8(sim(image))
                differing = int(np.sum(out != ref))
                assert differing == 0, (f"{ladder} {spec.name} {image.shape}: {differing} of "
                                        f"{out.size} output values differ from the simulation")


def _session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    """The engine with ``outputs`` as extra graph outputs, optimized as the runtime does."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in outputs:
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                    None))
    return ort.InferenceSession(copy.SerializeToString(), session_options(1),
                                providers=["CPUExecutionProvider"])


def test_float_output_convs_run_on_integer_levels(
        imdn: tuple[Path, dict[str, Any], dict[str, Path]]) -> None:
    """Emulate ladder: no conv output is requantized, and each conv computes
    ``fp32(acc) * fp32(s_x * s_w) + b`` from its integer levels: FP32 sums of integers below
    2^24 are exact, so the output is the same whatever order the kernel sums in."""
    _, _, bundles = imdn
    bundle = open_bundle(bundles["emulate"])
    spec = next(s for s in bundle.manifest.engines if not s.reference)
    model = onnx.load(bundles["emulate"] / spec.onnx.path)
    summary = {entry["name"]: entry for entry in lowering_summary(model)}
    assert all(entry["integer_conv"] for entry in summary.values())
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    convs = conv_nodes(model.graph, list(summary))
    def constant(tensor: str) -> npt.NDArray[np.float32]:  # a DQ of signs x magnitudes
        node = producers[tensor]
        assert node.op_type == "DequantizeLinear"
        return (inits[node.input[0]].astype(np.float32).reshape(1, -1, 1, 1)
                * inits[node.input[1]].reshape(1, -1, 1, 1))

    taps = {}
    for name, conv in convs.items():
        levels = producers[conv.input[0]]
        weight = inits[conv.input[1]]  # a constant: ORT's fast FP32 conv, integer-valued
        assert levels.op_type == "DequantizeLinear" and inits[levels.input[1]] == 1
        assert np.array_equal(weight, np.round(weight)) and np.abs(weight).max() <= 127
        scaled = readers[conv.output[0]][0]
        assert scaled.op_type == "Mul" and len(conv.input) == 2  # the bias is added after
        biased = readers[scaled.output[0]][0]
        assert biased.op_type == "Add"
        taps[name] = (conv.input[0], weight, constant(scaled.input[1]),
                      constant(biased.input[1]), biased.output[0])
    session = _session(model, [t for tap in taps.values() for t in (tap[0], tap[4])])
    x = _images()[0].transpose(2, 0, 1)[None].astype(np.float32) / 255
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {session.get_inputs()[0].name: x}), strict=True))
    for name, (levels, weight, scale, bias, output) in taps.items():
        assert np.array_equal(got[levels], np.round(got[levels]))  # integer levels
        pad = convs[name].attribute
        padding = next((a.ints[0] for a in pad if a.name == "pads"), 0)
        acc = torch.nn.functional.conv2d(torch.from_numpy(got[levels]).double(),
                                         torch.from_numpy(weight.astype(np.float64)),
                                         padding=padding).numpy()
        expected = acc.astype(np.float32) * scale + bias
        assert np.array_equal(got[output], expected), name


def test_attention_statistics_are_rounded_from_fp64(
        imdn: tuple[Path, dict[str, Any], dict[str, Path]]) -> None:
    """The contrast-aware attention gate of the engine is the FP32 rounding of its FP64 value
    (what the simulation computes), not an FP32 ReduceMean's (~1e-5 off on whole images)."""
    weights, _, bundles = imdn
    bundle = open_bundle(bundles["hardware"])
    spec = next(s for s in bundle.manifest.engines if not s.reference)
    model = onnx.load(bundles["hardware"] / spec.onnx.path)
    gates = [node for node in model.graph.node if node.op_type == "Mul"
             and any(name.startswith("cat") for name in node.input)]
    assert len(gates) == 2  # one per block
    taps = [name for node in gates for name in node.input]
    session = _session(model, taps)
    x = _images()[0].transpose(2, 0, 1)[None].astype(np.float32) / 255
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {session.get_inputs()[0].name: x}), strict=True))
    net = load_model(weights).model
    for block, node in enumerate(gates, start=1):
        features, gate = (got[name] for name in node.input)
        if features.shape[1] != gate.shape[1]:  # channels-last inside ORT's optimized graph
            features = features.transpose(0, 3, 1, 2)
        cca = net.get_submodule(f"IMDB{block}.cca")
        assert isinstance(cca, CCALayer)
        with torch.no_grad():
            expected = cca._gate_fp64(torch.from_numpy(np.ascontiguousarray(features)))
        assert np.array_equal(gate.reshape(-1), expected.numpy().reshape(-1)), f"IMDB{block}"

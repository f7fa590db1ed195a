"""IMDN's attention in FP32 TensorRT-dialect graphs: the same bits in ONNX Runtime and in the
simulation (``compiler.lower.pooled``, ``compiler.parity.ExactAttention``).

Before the rewrite, ONNX Runtime's FP32 ReduceMean, Pow, 1x1 Conv and Sigmoid each differed from
torch's by ulps on IMDN x4 / Set5 'baby' (60 of 64 gates of the fifth block), and a gate next to
a rounding tie of the next conv's grid moved 108 levels there (48.3 dB, 17% of the output
values; ``benchmarks/bundle_parity.py --dialect tensorrt``). Each test here compares every
attention's output in the engine, run by ONNX Runtime, with the simulation's attention on the
engine's own input to it, bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from compiler.lower.dialects import lower_engine
from compiler.lower.export import INPUT_NAME, export_onnx
from compiler.lower.graph import GraphEditor
from compiler.lower.pooled import SCALE, exact_statistics
from compiler.lower.qdq import lowering_facts
from compiler.parity import ExactAttention, exact_mean, logistic, newton_root
from compiler.zoo import load_model
from compiler.zoo.imdn import IMDN, CCALayer
from runtime.benchmark import load_benchmark
from runtime.engines.onnxruntime import session_options
from tests.conftest import require_shared

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), session_options(1, optimize=False),
                                providers=["CPUExecutionProvider"])


def _attentions(model: onnx.ModelProto, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input, output) of every attention of the lowered graph, run by ONNX Runtime: the Mul of
    a feature map by a rewritten gate (``*.gate``)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    muls = [node for node in model.graph.node if node.op_type == "Mul"
            and any(name.endswith(".gate") for name in node.input)]
    pairs = [(next(n for n in node.input if not n.endswith(".gate")), node.output[0])
             for node in muls]
    for name in {name for pair in pairs for name in pair}:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    names = [o.name for o in model.graph.output]
    values = dict(zip(names, _session(model).run(None, {INPUT_NAME: x}), strict=True))
    return [(values[i], values[o]) for i, o in pairs]


def _simulated(layer: CCALayer, x: np.ndarray, exact: bool = True) -> np.ndarray:
    """The attention of ``layer`` on ``x``: as the engine computes it, else torch's FP32."""
    layer.__class__ = ExactAttention if exact else CCALayer
    with torch.no_grad():
        out: np.ndarray = layer(torch.from_numpy(x)).numpy()
    return out


def _check(net: IMDN, images: list[np.ndarray]) -> int:
    """Every attention of the FP32 TensorRT-dialect graph of ``net`` equals the simulation's
    on its input; returns how many attention outputs were compared."""
    fp = export_onnx(net, 16, dynamic=True, dynamic_batch=True)
    model = lower_engine(fp, [], dialect="tensorrt", float_type="fp32")
    assert lowering_facts(model)["statistics"] == "exact"
    assert not {"ReduceMean", "Sigmoid", "Pow"} & {node.op_type for node in model.graph.node}
    layers = [m for m in net.modules() if isinstance(m, CCALayer)]
    compared = float_differing = 0
    for image in images:
        pairs = _attentions(model, image)
        assert len(pairs) == len(layers)
        for k, ((inp, out), layer) in enumerate(zip(pairs, layers, strict=True)):
            differing = int(np.sum(_simulated(layer, inp) != out))
            assert differing == 0, f"attention {k}, image {image.shape}: {differing} values"
            compared += out.size
            float_differing += int(np.sum(_simulated(layer, inp, exact=False) != out))
    assert float_differing > 0  # the comparison sees ulps: torch's FP32 attention is not it
    return compared


def test_tiny_imdn_attention_is_bit_exact_in_onnx_runtime() -> None:
    """24 channels (the 1x1 convs' products padded to 32 for their tree), odd image sizes."""
    torch.manual_seed(0)
    net = IMDN(scale=2, nf=24, num_modules=2).eval()
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, h, w), dtype=np.float32) for h, w in ((17, 23), (32, 9))]
    assert _check(net, images) == 2 * 24 * (17 * 23 + 32 * 9)


def test_real_imdn_x4_attention_is_bit_exact_on_set5_baby() -> None:
    """The real checkpoint on the image whose attention flipped levels before."""
    weights = require_shared("weights/imdn_x4.pth")
    baby = load_benchmark(require_shared("benchmarks/Set5"), 4)[0]
    assert baby.lr.shape == (128, 128, 3)
    x = (baby.lr.transpose(2, 0, 1)[None] / 255).astype(np.float32)
    net = load_model(weights).model
    assert isinstance(net, IMDN)
    assert _check(net, [x]) == 6 * 64 * 128 * 128


def _mean_graph() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=1)], "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    editor = GraphEditor(model.graph)
    assert exact_statistics(editor, 17) == 1
    editor.finish()
    onnx.checker.check_model(model)
    return model


def test_exact_mean_is_the_same_bits_and_within_its_grid() -> None:
    """A large offset with a small spread (where ONNX Runtime's FP32 ReduceMean was 1.6e-5
    off), signed values, a channel of zeros and one of tiny values: the graph and the
    simulation agree bit for bit, within ``max |y| 2^-25`` of the exact mean (plus the FP32
    rounding of the result)."""
    rng = np.random.default_rng(1)
    h, w = 131, 67
    x = np.stack([1000 + rng.standard_normal((h, w)), rng.standard_normal((h, w)),
                  np.zeros((h, w)), 1e-30 * rng.random((h, w))]).astype(np.float32)[None]
    got = _session(_mean_graph()).run(None, {"x": x})[0]
    sim = exact_mean(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, sim)
    exact = x.astype(np.float64).mean(axis=(2, 3), keepdims=True)
    bound = np.abs(x).max(axis=(2, 3), keepdims=True) / float(SCALE) / 2 + np.abs(exact) * 2e-7
    assert np.all(np.abs(got - exact) <= bound)
    assert got[0, 2, 0, 0] == 0.0


def test_logistic_and_root_are_accurate() -> None:
    z = torch.linspace(-30, 30, 600001)
    exact = torch.sigmoid(z.double())
    assert float((logistic(z).double() - exact).abs().max()) < 2.5e-7
    v = torch.logspace(-16, 16, 100001, dtype=torch.float64).float().reshape(-1, 1, 1, 1)
    true = torch.sqrt(v.double())
    ulp = torch.from_numpy(np.spacing(np.sqrt(v.numpy())).astype(np.float64))
    # the start max |c| is between the root and sqrt(H W) <= 2^12 times it (2^24 pixels)
    for ratio in (1.0, 3.0, 4096.0):
        root = newton_root(v, (true * ratio).float())
        assert float(((root.double() - true).abs() / ulp).max()) <= 1.0, ratio

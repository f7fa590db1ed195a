"""INT8 engines on OpenVINO: keep its CPU plugin from fusing a requantized conv output and the
residual add into one conv kernel, which drops a rounding the graph asks for.

The bundles' residual blocks read ``DQ(Q(conv)) + DQ(Q(skip))``, then ``Q`` (ONNX Runtime runs
it as QLinearConv + QLinearAdd, and the simulation models exactly that). OpenVINO 2026.4's CPU
plugin fuses the Add into the conv as an in-place ``sum`` post-op between the two FakeQuantize
post-ops, and that kernel adds the conv's *unrounded* value: its output equals ``Q(conv + skip)``
in 98% of values and the graph's ``Q(Q(conv) + skip)`` in only 82% (a 2-input test graph,
tests/compiler/test_openvino.py). Each such level seeds a cascade through EDSR's trunk: the
EDSR x2 hardware INT8 engine was 50.2 dB from ONNX Runtime on Set5, 55.6 dB with this fix.

The same holds where the skip is a float tensor (the trunk ends kept FP32). The plugin fuses the
add only when the conv is its input's sole reader (``GraphOptimizer::
FuseConvolutionSumAndConvolutionSumActivation``), so each dequantized 8-bit input of an Add of
two tensors gets one more reader: a 1-element slice, returned as an extra model output that
nobody reads (the engine takes output 0). The conv keeps its INT8 kernel and fused output
FakeQuantize; the add and its FakeQuantize run as one small elementwise kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_INT8 = ("u8", "i8")


def _dequantized(output: Any) -> bool:
    """``output`` is OpenVINO's form of a DequantizeLinear of 8-bit values:
    ``Multiply(Subtract(Convert(u8/i8), zero point), scale)`` (the Subtract optional)."""
    node = output.get_node()
    if node.get_type_name() != "Multiply":
        return False
    for port in node.inputs():
        source = port.get_source_output().get_node()
        if source.get_type_name() == "Subtract":
            source = source.input(0).get_source_output().get_node()
        if (source.get_type_name() == "Convert"
                and source.input(0).get_element_type().get_type_name() in _INT8):
            return True
    return False


def unfuse_quantized_adds(model: Any) -> int:
    """Give each dequantized 8-bit input of every Add of two tensors in ``model`` (an
    ``openvino.Model``, changed in place) a second reader, a 1-element slice returned as an
    extra output after the model's own; returns how many Adds."""
    import openvino.opset13 as ops

    adds = [op for op in model.get_ordered_ops() if op.get_type_name() == "Add"
            and any(_dequantized(port.get_source_output()) for port in op.inputs())
            and not any(port.get_source_output().get_node().get_type_name() == "Constant"
                        for port in op.inputs())]
    for add in adds:
        for port in add.inputs():
            tensor = port.get_source_output()
            if not _dequantized(tensor):
                continue
            rank = tensor.get_partial_shape().rank.get_length()
            start = ops.constant(np.zeros(rank, dtype=np.int64))
            step = ops.constant(np.ones(rank, dtype=np.int64))
            model.add_results([ops.result(ops.slice(tensor, start, step, step))])
    return len(adds)

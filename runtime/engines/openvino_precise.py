"""The BF16 engine's image path, kept in FP32: which nodes of an OpenVINO model read or write
the image, and the model with those nodes marked so that the CPU plugin runs them in FP32.

Why: BF16 keeps 8 significant bits. A pixel k/255 stored in BF16 moves by up to half a level,
and so does an image-scale tensor (EDSR's mean-shifted 0..255 input, its output before the
/255). Compiled with ``INFERENCE_PRECISION_HINT=bf16`` as a whole, EDSR x2 loses 0.044 dB on
Set5 (37.757 against 37.801 dB), and almost all of it is in those 3-channel convs: OpenVINO folds
the x255 into ``sub_mean``, so that conv reads the pixels in BF16. Kept in FP32 (measured on
Set5): ``sub_mean`` alone -0.029 dB, with the head conv -0.018, ``add_mean`` alone -0.011, all
four convs of the image path +0.0006 dB; BF16 convs and residual adds in the trunk cost nothing
measurable (the residual stream in FP32 changed nothing). Those convs are a small share of the
work (3 input or 3 output channels): the engine stays 1.8-1.9x faster than FP32
(benchmarks/engine_speed.py).

How (OpenVINO's CPU plugin, ``Graph::EnforceInferencePrecision``): a node whose rt_info holds
the precision-keeping attribute (``precise`` v0, OpenVINO's ``disable_fp16_compression``; and
``DisablePrecisionConversion`` v0 of newer releases) keeps its original precision under a BF16
hint. The attribute is not copyable, so a fusion that replaces the node drops it: the model first
gets OpenVINO's own common fusions (``apply_moc_transformations``, e.g. the ``x * 255`` folded
into the first conv), then the marks, then its IR is read back (the attribute objects exist only
in C++: the IR reader makes them from the XML; Python can set only plain values). Tests check
the executed precision of every marked conv in ``compiled_model.get_runtime_model()``.

The image path: from each input forward through every node, stopping after a conv/matmul whose
output is no longer image-shaped (its channel count is not the image's); from each output
backward the same way (a conv whose input is image-shaped -- e.g. EDSR's ``add_mean`` 1x1 conv
-- is passed through). EDSR x2: ``sub_mean``, the head conv, the last conv and ``add_mean``.
"""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import EngineError

# the ops whose arithmetic the image's precision goes through (they end the image path unless
# their output keeps the image's channel count)
WEIGHTED = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData",
                      "GroupConvolutionBackpropData", "MatMul"})
# the rt_info attributes (name, version, value) that keep a node's precision under a lower
# inference-precision hint: OpenVINO's long-standing one and its newer, per-type one
KEEP = (("precise", "0", None), ("DisablePrecisionConversion", "0", "dynamic:dynamic"))


def _channels(output: Any) -> int | None:
    shape = output.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() < 2 or shape[1].is_dynamic:
        return None
    return int(shape[1].get_length())


def _data_inputs(op: Any) -> list[Any]:
    return [i.get_source_output() for i in op.inputs()
            if i.get_source_output().get_node().get_type_name() != "Constant"]


def image_path(model: Any) -> frozenset[str]:
    """Friendly names of the nodes of ``model`` (an ``openvino.Model``) that read or write the
    image (see the module docstring)."""
    image = {_channels(p.output(0)) for p in model.get_parameters()} - {None}
    if not image:
        raise EngineError("cannot find the image path of a model whose input has no channel "
                          "dimension of known size")
    found: set[str] = set()
    frontier = [p.output(0) for p in model.get_parameters()]
    while frontier:  # forward from the inputs
        for target in frontier.pop().get_target_inputs():
            op = target.get_node()
            name = op.get_friendly_name()
            if op.get_type_name() == "Result" or name in found:
                continue
            found.add(name)
            if op.get_type_name() not in WEIGHTED or _channels(op.output(0)) in image:
                frontier.extend(op.outputs())
    seen: set[str] = set()
    backward = [r.input(0).get_source_output() for r in model.get_results()]
    while backward:  # backward from the outputs
        op = backward.pop().get_node()
        name = op.get_friendly_name()
        if op.get_type_name() in ("Parameter", "Constant") or name in seen:
            continue
        seen.add(name)
        found.add(name)
        inputs = _data_inputs(op)
        if op.get_type_name() not in WEIGHTED or (inputs and _channels(inputs[0]) in image):
            backward.extend(inputs)
    return frozenset(found)


def _mark(xml: bytes, names: frozenset[str]) -> bytes:
    """The IR ``xml`` with the precision-keeping attributes on the layers named ``names``."""
    root = ElementTree.fromstring(xml)
    for layer in root.iter("layer"):
        if layer.get("name") not in names:
            continue
        info = layer.find("rt_info")
        if info is None:
            info = ElementTree.Element("rt_info")
            layer.insert(1 if layer.find("data") is not None else 0, info)
        for name, version, value in KEEP:
            attribute = ElementTree.SubElement(info, "attribute", name=name, version=version)
            if value is not None:
                attribute.set("value", value)
    return ElementTree.tostring(root)


def keep_image_path(core: Any, model: Any) -> tuple[Any, frozenset[str]]:
    """``model`` after OpenVINO's common fusions, with its image path marked to keep FP32 under
    a BF16 inference precision; and the marked nodes' names."""
    import openvino
    from openvino._offline_transformations import apply_moc_transformations

    apply_moc_transformations(model, cf=False)
    names = image_path(model)
    with tempfile.TemporaryDirectory(prefix="adasr-openvino-") as folder:
        xml = Path(folder) / "model.xml"
        openvino.save_model(model, str(xml), compress_to_fp16=False)
        weights = np.fromfile(xml.with_suffix(".bin"), dtype=np.uint8)
        marked = _mark(xml.read_bytes(), names)
    return core.read_model(marked, openvino.Tensor(weights)), names

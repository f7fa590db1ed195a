"""The conv that reads the image, in FP32 on the integer pixels: accurate *and* exact.

The image conv's input (EDSR: ``255 x - 255 mean``, the mean-shifted image) has no exact
per-tensor 8-bit grid (its three channel offsets differ), and its INT8 version costs accuracy
(``compiler.plan``). In FP32 it is accurate, but an FP32 conv rounds its partial sums in an
order the simulation cannot reproduce, and in a network with per-image statistics one rounding
flip multiplies (IMDN x4: 41.7 dB between engine and simulation). So the engine computes it on
integers, where FP32 sums are exact:

- the runtime's input is an 8-bit image on ``[0, 1]``: ``k = Round(255 x)`` are its pixels;
- the conv's input is ``u = a x + c`` (``a``: the ``rgb_range`` product, ``c``: a per-channel
  shift such as EDSR's MeanShift), so ``conv(u) = (a / 255) conv(k) + sum(W c)``;
- the zero padding of ``u`` is a padding of ``k`` with ``p = round(-255 c / a)`` (EDSR: the
  rounded mean pixel 114 / 111 / 103, off by under half a grey level at the padded positions
  only; 0, exactly, for networks without a mean shift);
- the weights go on a per-output-channel integer grid as fine as exactness allows
  (``levels = min(2047, (2^24 - 1) // (taps * 255))``: 12 bits for a 3x3 conv on RGB), so every
  sum of ``k * w_int`` is an integer below 2^24, exact in any order;
- the weight constant is those levels times the power of two ``2^p`` in ``[scale, 2 scale)``
  (per output channel), so the conv's outputs are the exact sums times a power of two, under
  twice the FP conv's (an FP16 layer that a TensorRT builder with its legacy FP16 flag may pick
  does not overflow);
- then ``* (scale / 2^p) + bias`` per output channel, single FP32 operations
  (``compiler.lower.exact``): ``acc * scale`` rounded once, as the simulation computes it.

:func:`image_conv_constants` computes the grid and the folded constants; the lowering
(:func:`exact_image_conv`) and the parity simulation (``compiler.parity.ExactImageConv``) both
use it, so they compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from compiler.lower.exact import (
    PerChannel,
    exact_epilogue,
    per_channel_constant,
    plain_constant,
    power_of_two_above,
)
from compiler.lower.graph import GraphEditor

PIXEL_LEVELS = 255  # an 8-bit image
MAX_WEIGHT_LEVELS = 2047  # 12-bit weights: finer than any measurable difference from FP32
EXACT_SUM = 2**24 - 1  # FP32 holds every integer up to here


@dataclass(frozen=True)
class ImageConv:
    """The integer form of an image conv (see the module docstring)."""

    weights: npt.NDArray[np.float32]  # integer levels (per output channel grid)
    scale: npt.NDArray[np.float32]  # per output channel: (a / 255) * weight step
    bias: npt.NDArray[np.float32]  # per output channel: b + sum(W_q c)
    pad: npt.NDArray[np.float32]  # per input channel: the pixel value of a zero input
    levels: int


def image_conv_constants(weight: npt.NDArray[Any], bias: npt.NDArray[Any] | None, a: float,
                         c: npt.NDArray[Any]) -> ImageConv:
    """Integer weights and folded constants of a conv on ``u = a x + c`` (x an 8-bit image)."""
    w = np.asarray(weight, dtype=np.float32).astype(np.float64)
    out_channels, taps = w.shape[0], int(np.prod(w.shape[1:]))
    levels = min(MAX_WEIGHT_LEVELS, EXACT_SUM // (taps * PIXEL_LEVELS))
    top = np.abs(w).reshape(out_channels, -1).max(axis=1)
    step = np.where(top > 0, top, 1.0) / levels
    w_int = np.round(w / step[:, None, None, None])
    shift = np.asarray(c, dtype=np.float64)
    b = np.zeros(out_channels) if bias is None else np.asarray(bias, dtype=np.float32)
    folded = b.astype(np.float64) + np.einsum("oikl,i->o", w_int * step[:, None, None, None],
                                              shift)
    pad = np.clip(np.round(-shift * PIXEL_LEVELS / a), 0, PIXEL_LEVELS)
    return ImageConv(weights=w_int.astype(np.float32),
                     scale=(a / PIXEL_LEVELS * step).astype(np.float32),
                     bias=folded.astype(np.float32), pad=pad.astype(np.float32), levels=levels)


def _image_affine(g: GraphEditor, tensor: str, channels: int
                  ) -> tuple[str, float, npt.NDArray[np.float64], list[onnx.NodeProto]] | None:
    """``u = a x + c`` from a graph input ``x`` to ``tensor`` through scalar Mul / Div and
    identity 1x1 convs with a bias (MeanShift): (input, a, c, the path's nodes), else None."""
    inputs = {i.name for i in g.graph.input}
    path: list[onnx.NodeProto] = []
    steps: list[tuple[str, npt.NDArray[Any]]] = []  # (op, constant), from the conv backwards
    while tensor not in inputs:
        node = g.producer(tensor)
        if node is None:
            return None
        if node.op_type in ("Mul", "Div"):
            value = g.inits.get(node.input[1])
            if value is None or numpy_helper.to_array(value).size != 1:
                return None
            steps.append((node.op_type, numpy_helper.to_array(value)))
        elif node.op_type == "Conv" and len(node.input) == 3:
            weight, bias = (g.inits.get(node.input[i]) for i in (1, 2))
            if weight is None or bias is None:
                return None
            w = numpy_helper.to_array(weight)
            if w.shape != (channels, channels, 1, 1) or not np.array_equal(
                    w[:, :, 0, 0], np.eye(channels, dtype=w.dtype)):
                return None
            steps.append(("Shift", numpy_helper.to_array(bias)))
        else:
            return None
        path.append(node)
        tensor = node.input[0]
    a, c = 1.0, np.zeros(channels)
    for op, value in reversed(steps):  # forward order
        if op == "Shift":
            c = c + value.astype(np.float64)
        elif op == "Mul":
            a, c = a * float(value.reshape(())), c * float(value.reshape(()))
        else:
            a, c = a / float(value.reshape(())), c / float(value.reshape(()))
    return tensor, a, c, path


def exact_image_conv(g: GraphEditor, conv: onnx.NodeProto, name: str,
                     constant: PerChannel = per_channel_constant) -> dict[str, Any] | None:
    """Rewrite the image conv ``conv`` into its integer form; the summary entry's
    ``image_input`` (``a``, ``c``), or None (graph unchanged) when its input is not an affine
    function of a graph input, it is grouped or auto-padded, or its output is a graph output.
    ``constant`` writes the per-channel scale and bias (see ``exact_epilogue``)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    weight = g.inits.get(conv.input[1])
    if (weight is None or conv.output[0] in g.outputs or attrs.get("group", 1) != 1
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    w = numpy_helper.to_array(weight)
    found = _image_affine(g, conv.input[0], int(w.shape[1]))
    if found is None:
        return None
    source, a, c, path = found
    bias_init = g.inits.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if len(conv.input) > 2 and conv.input[2] and bias_init is None:
        return None
    form = image_conv_constants(w, None if bias_init is None else numpy_helper.to_array(
        bias_init), a, c)
    base = f"{name}.image"
    levels = g.node("Round", [g.node("Mul", [source, g.constant(
        f"{base}.pixels", np.array(PIXEL_LEVELS, dtype=np.float32))], f"{base}.scaled")],
        f"{base}.levels")
    pads = [int(v) for v in attrs.get("pads", [0] * 4)]
    if any(pads):
        half = len(pads) // 2
        spec = np.array([0, 0, *pads[:half], 0, 0, *pads[half:]], dtype=np.int64)
        pad = plain_constant(g, form.pad, f"{base}.pad")
        shifted = g.node("Sub", [levels, pad], f"{base}.shifted")
        padded = g.node("Pad", [shifted, g.constant(f"{base}.pads", spec)], f"{base}.padded")
        levels = g.node("Add", [padded, pad], f"{base}.padded_levels")
    weight_name = conv.input[1]  # keeps its name: engines are addressed by module name
    g.release(weight_name)
    unit = power_of_two_above(form.scale)
    conv.input[:] = [levels, g.constant(weight_name, form.weights * unit[:, None, None, None])]
    for attribute in conv.attribute:
        if attribute.name == "pads":
            del attribute.ints[:]
            attribute.ints.extend([0] * len(pads))
    exact_epilogue(g, conv, form.scale / unit, form.bias, f"{base}.output", constant)
    for node in path:  # from the conv backwards: each becomes unread once the next is dropped
        if not g.consumers(node.output[0]):
            g.drop(node)
    return {"a": a, "c": [float(v) for v in c], "levels": form.levels}

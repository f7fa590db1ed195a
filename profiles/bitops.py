"""BitOPs of an engine from its ONNX graph and the manifest's per-layer bit widths.

BitOPs follow the compiler's definition (``adasr eval``): every conv MAC counts
``w_bits / 32 * a_bits / 32`` (a float layer, or one the manifest does not list, counts 32 x 32,
i.e. 1), in units of 1e9. The MACs of each conv come from ONNX shape inference on the engine's
graph with its input fixed to ``1 x 3 x tile x tile``; a conv is matched to its
:class:`~runtime.manifest.LayerPlan` by its weight name (``<layer>.weight``, kept by the
lowering). The count is per tile, so the dispatcher's tiles (overlaps included) are what is
counted for a frame. ``onnx`` is imported here only: without it (a device may lack it), or when
a conv's output shape cannot be inferred, the BitOPs are unknown (``None``).
"""

from __future__ import annotations

import math
from pathlib import Path

from profiles.layers import CONV_OPS, WEIGHT_PATH
from runtime.bundlepaths import bundle_path
from runtime.manifest import EngineSpec

__all__ = ["FLOAT_BITS", "conv_macs", "tile_gbitops"]

FLOAT_BITS = 32


def conv_macs(path: Path, tile: int) -> dict[str, int] | None:
    """Weight name -> MACs of each conv for one ``tile`` x ``tile`` input; None if unknown."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in inits]
    if len(inputs) != 1:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        return None
    for dim, size in zip(dims, (1, 3, tile, tile), strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = size
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=True).graph
    except Exception:  # onnx raises several untyped errors for graphs it cannot infer
        return None
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else -1
                       for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.output]}
    producers = {out: node for node in graph.node for out in node.output}
    macs: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in CONV_OPS - {"ConvTranspose"}:
            continue
        weight = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
        while weight in producers and producers[weight].op_type in WEIGHT_PATH:
            weight = producers[weight].input[0]
        out = shapes.get(node.output[0])
        if weight not in inits or out is None or min(out, default=-1) < 1:
            return None
        per_output = math.prod(inits[weight].dims[1:])  # C_in / groups x kh x kw
        macs[weight] = macs.get(weight, 0) + math.prod(out) * per_output
    return macs


def tile_gbitops(spec: EngineSpec, root: Path, tile: int) -> float | None:
    """GBitOPs of one engine call on one ``tile`` x ``tile`` LR tile (None when unknown)."""
    macs = conv_macs(bundle_path(root, spec.onnx.path, f"engine {spec.name!r}"), tile)
    if macs is None:
        return None
    bits = {layer.name: layer for layer in spec.layers}
    total = 0.0
    for weight, count in macs.items():
        layer = bits.get(weight.removesuffix(".weight"))
        w_bits = layer.w_bits if layer is not None and layer.w_bits is not None else FLOAT_BITS
        a_bits = layer.act_bits if layer is not None and layer.act_bits is not None else FLOAT_BITS
        total += count * (w_bits / FLOAT_BITS) * (a_bits / FLOAT_BITS)
    return total / 1e9

"""Export a full-precision zoo network to ONNX once, and find its convs again by module name.

``export_onnx`` runs torch's exporter (the dynamo exporter of torch >= 2.5) on the FP network:
input ``lr`` and output ``sr``, NCHW float32 in [0, 1], opset 17 by default (TensorRT 8.5 parses
<= 17; torch exports opset 18 and converts down). The shape is static for one tile size, or has
dynamic height and width (``dynamic=True``). Weights are embedded (one file, no ``.onnx.data``)
and ``ir_version`` is pinned to the lowest IR of the model's opsets: onnx 1.23 writes IR 14, which
onnxruntime 1.31 refuses (it loads <= 13), and older parsers read the lowest IR best.

Every quantized engine is lowered from this one FP graph (``compiler.lower.qdq``), which finds
each conv of a module name through ``find_conv``: the exporter names weight initializers after the
state-dict keys (``body.0.body.2.weight``); the lookup also accepts the ``p_body_0_body_2_weight``
spelling of other exporter versions and says which names exist when one is missing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx.version_converter
import torch

from compiler.zoo.base import SRNet
from runtime.errors import ConfigError, EngineError, did_you_mean
from runtime.fileio import atomic_write_bytes
from runtime.manifest import INPUT_NAME, MIN_OPSET

DEFAULT_OPSET = 17
OUTPUT_NAME = "sr"


def pin_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Set ``model.ir_version`` to the lowest IR that supports its opsets (in place)."""
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    return model


def export_onnx(model: SRNet, tile: int | tuple[int, int], *, opset: int = DEFAULT_OPSET,
                dynamic: bool = False, batch: int = 1,
                dynamic_batch: bool = False) -> onnx.ModelProto:
    """The FP network as an ONNX model for ``tile`` (LR height, width) inputs of ``batch`` images.

    With ``dynamic=True`` height and width are symbolic (``tile`` is then only the example shape);
    ``dynamic_batch=True`` makes the batch symbolic too (the example then has 2 images: the
    exporter specializes size-1 dimensions).
    Raises :class:`EngineError` when the exporter fails or a quantizable conv cannot be found in
    the exported graph.
    """
    height, width = (tile, tile) if isinstance(tile, int) else tile
    if min(height, width, batch) < 1 or opset < MIN_OPSET:
        raise ConfigError(f"cannot export tile {height}x{width}, batch {batch}, opset {opset}: "
                          f"tile and batch must be >= 1 and opset >= {MIN_OPSET}")
    example = torch.rand(max(batch, 2) if dynamic_batch else batch, 3, height, width)
    dims: dict[int, Any] = {}
    if dynamic:
        dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch")
    shapes = (dims,) if dims else None
    was_training = model.training
    model.eval()
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, external_data=False, dynamic_shapes=shapes,
                verbose=False)
    except Exception as err:  # the exporter raises many unrelated types
        raise EngineError(f"ONNX export of {type(model).__name__} failed at opset {opset}, "
                          f"tile {height}x{width}: {err}") from err
    finally:
        model.train(was_training)
    if program is None:
        raise EngineError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    found = [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")]
    if found and found[0] > opset:  # torch's own down-conversion gave up (e.g. ReduceMean 18)
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as err:  # the converter raises plain RuntimeErrors
            raise EngineError(f"cannot convert the exported opset {found[0]} graph to opset "
                              f"{opset}: {err}") from err
        found = [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")]
        _drop_new_reduce_attributes(proto)
    proto = pin_ir_version(proto)
    if found != [opset]:
        raise EngineError(f"the exporter wrote opset {found}, not the requested {opset}")
    conv_nodes(proto.graph, [*model.adaptive_convs(), *model.fixed_convs()])  # fail now
    return proto


def _drop_new_reduce_attributes(model: onnx.ModelProto) -> None:
    """The converter leaves opset 18's ``noop_with_empty_axes`` on Reduce* nodes it moved below
    18, where the attribute does not exist; its default (0) is the older opsets' behaviour."""
    for node in model.graph.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            kept = [a for a in node.attribute
                    if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(kept)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's expected chatter (opset 18 -> 17 conversion, torchvision notes);
    a failure still raises with its full message."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` as one self-contained file, atomically."""
    atomic_write_bytes(path, model.SerializeToString())


def _canonical(name: str) -> str:
    """``body.0.body.2.weight`` and ``p_body_0_body_2_weight`` give ``body_0_body_2_weight``."""
    flat = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")
    return flat.removeprefix("p_")


def _weight_source(producers: dict[str, onnx.NodeProto], tensor: str) -> str:
    """The name a conv's weight comes from, through Identity and (lowered graphs) DQ nodes."""
    node = producers.get(tensor)
    while node is not None and node.op_type in ("Identity", "DequantizeLinear"):
        tensor = node.input[0]
        node = producers.get(tensor)
    return tensor


def conv_nodes(graph: onnx.GraphProto, modules: list[str]) -> dict[str, onnx.NodeProto]:
    """The Conv node of each module name (its weight is ``{module}.weight``).

    Raises :class:`EngineError` naming the closest conv when a module has none.
    """
    producers = {out: node for node in graph.node for out in node.output}
    by_weight: dict[str, list[tuple[str, onnx.NodeProto]]] = {}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            weight = _weight_source(producers, node.input[1])
            display = re.sub(r"[._]weight$", "", weight)
            by_weight.setdefault(_canonical(weight), []).append((display, node))
    found = {}
    for module in modules:
        entries = by_weight.get(_canonical(f"{module}.weight"), [])
        if len(entries) != 1:
            known = sorted({display for group in by_weight.values() for display, _ in group})
            problem = (f"{len(entries)} convs share the weight '{module}.weight' (the exporter "
                       "merges bit-identical weights)" if entries else
                       f"no conv weight is named '{module}.weight'{did_you_mean(module, known)}")
            raise EngineError(f"cannot find the Conv of layer {module!r} in the ONNX graph: "
                              f"{problem}. Convs by weight name: {', '.join(known)}")
        found[module] = entries[0][1]
    return found


def find_conv(graph: onnx.GraphProto, module: str) -> onnx.NodeProto:
    """The Conv node of ``graph`` for one module name (see :func:`conv_nodes`)."""
    return conv_nodes(graph, [module])[module]

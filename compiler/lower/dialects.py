"""The lowering's dialect registry: each dialect (``compiler.lower.ort``, ``compiler.lower.trt``,
both built on the shared core ``compiler.lower.qdq``) with its lowering function and the facts
about its graphs' arithmetic that the simulation (``compiler.parity``) models.

A backend names the dialect its engines read (``runtime.backends.RuntimeBackend.dialect``);
nobody else compares a dialect's name with a string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from compiler.layers import EngineLayer
from compiler.lower.ort import lower_ort
from compiler.lower.qdq import FLOAT_TYPES
from compiler.lower.trt import lower_tensorrt
from runtime.errors import ConfigError, unknown_name


@dataclass(frozen=True)
class Arithmetic:
    """How a dialect's engines compute, as far as the simulation must model it."""

    # a quantized conv followed by a Q gets its bias on the int32 s_x * s_w lattice (ONNX
    # Runtime's QLinearConv); else biases stay float
    integer_bias: bool
    # convs recorded with ``integer_conv`` accumulate exactly in integers (ORT QLinearConv),
    # statistics in FP64
    integer_convs: bool
    # convs recorded with ``integer_conv`` run on integer levels times powers of two (TensorRT)
    scaled_convs: bool
    # 8-bit output grids are symmetric int8 on max(|lo|, |hi|) (ReLU cuts at 0)
    symmetric_outputs: bool


@dataclass(frozen=True)
class Dialect:
    name: str
    lower: Callable[..., onnx.ModelProto]
    arithmetic: Arithmetic
    options: tuple[str, ...]  # keyword options of ``lower`` beyond the common ones


_DIALECTS = {
    "ort": Dialect("ort", lower_ort, Arithmetic(integer_bias=True, integer_convs=True,
                                                 scaled_convs=False, symmetric_outputs=False),
                   ("streams",)),
    "tensorrt": Dialect("tensorrt", lower_tensorrt,
                        Arithmetic(integer_bias=False, integer_convs=False, scaled_convs=True,
                                   symmetric_outputs=True), ()),
}
DIALECTS = tuple(_DIALECTS)


def dialect_of(name: str) -> Dialect:
    """The registered dialect ``name`` (a one-line ConfigError naming the known ones)."""
    if name not in _DIALECTS:
        raise ConfigError(unknown_name("lowering dialect", name, DIALECTS))
    return _DIALECTS[name]


def lower_engine(fp_model: onnx.ModelProto, layers: Sequence[EngineLayer], dialect: str = "ort",
                 *, requantize: bool = True, float_type: str = "fp32",
                 max_opset: int | None = None, streams: bool = True) -> onnx.ModelProto:
    """The FP graph with the Q/DQ of ``layers`` in ``dialect`` (placement:
    ``compiler.lower.qdq``). ``requantize=False`` leaves float every output that does not feed
    a quantized conv (an exact engine); ``float_type`` (``"fp32"``, or ``"fp16"`` for TensorRT)
    and ``max_opset`` (the target's parser) shape the graph; ``streams`` (ORT) quantizes
    residual streams once at 8 bits."""
    found = dialect_of(dialect)
    if float_type not in FLOAT_TYPES:
        raise ConfigError(unknown_name("float type", float_type, FLOAT_TYPES))
    extra: dict[str, Any] = {"streams": streams} if "streams" in found.options else {}
    return found.lower(fp_model, layers, requantize=requantize, float_type=float_type,
                       max_opset=max_opset, **extra)

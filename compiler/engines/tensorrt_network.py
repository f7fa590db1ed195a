"""What a parsed TensorRT network makes of a lowered graph: which convs it can run in INT8.

TensorRT's explicit quantization (developer guide, "Explicit Quantization", Q/DQ layer
placement and fusion) fuses ``DQ(x) -> Conv <- DQ(W)`` into an INT8 convolution, moving a DQ
forward only through layers that commute with it (pooling, shuffles, concatenation); a fill
Slice (how the ONNX parser imports a constant ``Pad``) is not one of them: a DQ that reaches
its conv through such a Slice leaves the conv in float, silently. The lowering
(``compiler.lower.trt``) therefore writes every quantized conv's input DQ *adjacent* to the
conv; :func:`inspect_network` reads that back from the network TensorRT's own ONNX parser built,
and :func:`check_int8_convs` refuses a network where it does not hold (a conv with quantized
weights whose input is not a DQ: TensorRT has no weight-only convolution either).

Works with any TensorRT Python module (``tensorrt``, ``tensorrt_rtx``): the caller passes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.errors import EngineError


@dataclass(frozen=True)
class ConvInputs:
    """One convolution layer of a parsed network: where its data and kernel come from."""

    name: str
    data_from: str  # the layer type producing the conv's input ("DEQUANTIZE", "SLICE", ...)
    kernel_from: str | None  # the layer type producing its kernel tensor (None: weights)
    kernel: str | None  # the kernel tensor's name (the lowering names it after its module)

    @property
    def quantized(self) -> bool:
        """Int8 weights behind a DQ: a conv the lowering quantized."""
        return self.kernel_from == "DEQUANTIZE"

    @property
    def int8(self) -> bool:
        """DQ -> Conv <- DQ: what TensorRT fuses into an INT8 convolution."""
        return self.quantized and self.data_from == "DEQUANTIZE"


@dataclass(frozen=True)
class NetworkReport:
    """The layers of a parsed network (``"TYPE name"``) and its convolutions."""

    layers: tuple[str, ...]
    convs: tuple[ConvInputs, ...]
    fill_slices: int  # constant-mode Pads as the parser imports them

    @property
    def quantized(self) -> tuple[ConvInputs, ...]:
        return tuple(conv for conv in self.convs if conv.quantized)

    @property
    def int8(self) -> tuple[ConvInputs, ...]:
        return tuple(conv for conv in self.convs if conv.int8)


def _type_name(layer: Any) -> str:
    return str(layer.type).rsplit(".", 1)[-1]


def inspect_network(network: Any, trt: Any) -> NetworkReport:
    """Read ``network`` (an ``INetworkDefinition`` of module ``trt``) into a report."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producers = {}
    for layer in layers:
        for i in range(layer.num_outputs):
            producers[layer.get_output(i).name] = layer
    convs, fill = [], 0
    for layer in layers:
        if layer.type == trt.LayerType.SLICE:
            layer.__class__ = trt.ISliceLayer  # the parser's layers come back as ILayer
            fill += int(layer.mode == trt.SampleMode.FILL)
            layer.__class__ = trt.ILayer
        if layer.type != trt.LayerType.CONVOLUTION:
            continue
        data = layer.get_input(0)
        kernel = layer.get_input(1) if layer.num_inputs > 1 else None
        data_layer = producers.get(data.name) if data is not None else None
        kernel_layer = producers.get(kernel.name) if kernel is not None else None
        convs.append(ConvInputs(
            name=layer.name,
            data_from=_type_name(data_layer) if data_layer is not None else "INPUT",
            kernel_from=_type_name(kernel_layer) if kernel_layer is not None else None,
            kernel=kernel.name if kernel is not None else None))
    return NetworkReport(tuple(f"{_type_name(layer)} {layer.name}" for layer in layers),
                         tuple(convs), fill)


def check_int8_convs(report: NetworkReport, source: str) -> None:
    """Raise :class:`EngineError` naming every conv with quantized weights whose input does not
    come straight from a DequantizeLinear (TensorRT would run it in float)."""
    broken = [conv for conv in report.quantized if not conv.int8]
    if broken:
        listing = ", ".join(f"{conv.name} (input from {conv.data_from})" for conv in broken)
        raise EngineError(f"{source}: {len(broken)} quantized conv(s) do not read a "
                          f"DequantizeLinear directly, so TensorRT cannot fuse them into INT8 "
                          f"convolutions: {listing}; lower the graph with this adasr version")

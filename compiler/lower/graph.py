"""A small editor over an ONNX graph: unique names, consumers and producers, new nodes and
initializers, nodes dropped and the rest sorted topologically when done. Every lowering module
writes through it; it imports nothing of the lowering.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from runtime.errors import EngineError


class GraphEditor:
    """A small editor over a GraphProto: unique names, consumers, new nodes and initializers."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self._used = {name for n in graph.node for name in [*n.input, *n.output, n.name]}
        self._used |= set(self.inits) | {i.name for i in graph.input}
        self._dropped: set[str] = set()  # first outputs of removed nodes (ReLUs folded into a Q)

    def _live(self, node: onnx.NodeProto) -> bool:
        return node.output[0] not in self._dropped

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input and self._live(n)]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.graph.node if tensor in n.output and self._live(n)), None)

    def constant_tensor(self, tensor: str) -> bool:
        """An initializer, or a DequantizeLinear of initializers (``compiler.lower.exact``)."""
        if tensor in self.inits:
            return True
        node = self.producer(tensor)
        return (node is not None and node.op_type == "DequantizeLinear"
                and all(t in self.inits for t in node.input if t))

    def drop(self, node: onnx.NodeProto) -> None:
        """Remove ``node`` when the graph is finished (its readers must be rewired)."""
        self._dropped.add(node.output[0])

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def release(self, name: str) -> None:
        """Remove an initializer and free its name."""
        self.graph.initializer.remove(self.inits.pop(name))
        self._used.discard(name)

    def constant(self, base: str, value: npt.NDArray[Any]) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def node(self, op: str, inputs: Sequence[str], base: str, **attrs: Any) -> str:
        out = self.fresh(base)
        self.graph.node.append(helper.make_node(op, list(inputs), [out], self.fresh(f"{base}_op"),
                                                **attrs))
        return out

    def finish(self) -> None:
        """Drop bypassed nodes and unused initializers, sort topologically, clear value_info."""
        kept = [n for n in self.graph.node if self._live(n)]
        ordered = _topological(kept, {i.name for i in self.graph.input} | set(self.inits))
        copies = [onnx.NodeProto() for _ in ordered]
        for copy, node in zip(copies, ordered, strict=True):
            copy.CopyFrom(node)  # detached before the repeated field is cleared
        del self.graph.node[:]
        self.graph.node.extend(copies)
        used = {name for n in copies for name in n.input}
        unused = [t for t in self.graph.initializer if t.name not in used]
        for tensor in unused:
            self.graph.initializer.remove(tensor)
        del self.graph.value_info[:]


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise EngineError(f"lowered graph has a cycle or a missing input near "
                              f"{pending[0].op_type} {pending[0].name!r}")
        for node in progress:
            ready.update(node.output)
        ordered += progress
        chosen = {id(n) for n in progress}
        pending = [n for n in pending if id(n) not in chosen]
    return ordered

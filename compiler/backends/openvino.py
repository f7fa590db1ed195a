"""OpenVINO's compiler side: the ONNX Runtime dialect's graphs as they are (OpenVINO's CPU plugin
runs their Q/DQ convs on INT8 kernels), plus a BF16 rung -- the FP32 graph, compiled with BF16
inference precision -- when the target's ladder lists ``bf16`` and this machine's CPU runs BF16
kernels (the capability probe; recorded in the manifest's ``build.capabilities``). The build
measures the rung ladder through OpenVINO's own engines, so the BF16 rung is one of the quality
policy's rungs."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from compiler.backends import Builder

if TYPE_CHECKING:
    from compiler.plan import EnginePlan

BF16 = "bf16"


class OpenVinoBuilder(Builder):
    name = "openvino"
    rung_ladder = True  # bicubic, all-INT8, INT8, BF16 (where the CPU has it), FP32

    def complete(self, plan: EnginePlan) -> EnginePlan:
        """``plan`` with a BF16 rung (serving no image offset: a rung of the ladder's policies)
        before the reference, when the target lists BF16 and this CPU has BF16 kernels."""
        from compiler.plan import PlannedEngine, fab_of

        engines = plan.engines
        if (BF16 not in plan.target.precision_ladder or BF16 in {e.name for e in engines}
                or BF16 not in self.runtime.probe().precisions):
            return plan
        reference = next(e for e in engines if e.reference)
        layers = tuple(replace(layer, precision=BF16) for layer in reference.layers)
        rung = PlannedEngine(name=BF16, precision=BF16, offsets=(), reference=False,
                             layers=layers, specs=(), fab=fab_of(layers, {e.name for e in layers}))
        return replace(plan, engines=(*(e for e in engines if not e.reference), rung, reference))


BUILDER = OpenVinoBuilder()

#!/usr/bin/env python3
"""Why AdaBM W4A4 depends on the machine: float32 kernel noise, and what quantization makes of it.

The same calibration record, the same patches, the same code give different float32 conv outputs
when the conv kernel changes (oneDNN picks its kernels and blocking by ISA and cache size; the
thread count changes the split of the reductions). This script measures it on one machine by
changing what a machine change changes: the thread count (1 vs 2) and the conv implementation
(oneDNN vs PyTorch's native one). For the EDSR x2 AdaBM W4A4 network of a record on the
calibration patches it reports

- the FP32 output difference (max abs, and the fraction of values not bit-identical);
- in the quantized network, the fraction of activation values whose 2-6 bit level differs
  (a rounding flip: a whole quantization step, ~1/15 of the range at 4 bits);
- the difference of the calibration loss and of its gradient on the quantizer parameters, which
  is what Adam follows for 500 steps.

Prints one line per comparison and ends with ``flips=<fraction>`` for 1 vs 2 threads; writes
benchmarks/results/calibration_noise.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from common import REPO, cpu_name, shared

from compiler.quant.patches import sample_patches
from compiler.quant.qmodel import QConv2d
from compiler.quant.record import apply_record, read_record
from compiler.zoo import load_model
from runtime.fileio import atomic_write_bytes


@contextmanager
def _setting(threads: int, mkldnn: bool) -> Iterator[None]:
    kept_threads, kept_mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    try:
        yield
    finally:
        torch.set_num_threads(kept_threads)
        torch.backends.mkldnn.enabled = kept_mkldnn


def _levels(qnet: torch.nn.Module,
            patches: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and, per quantized conv, the integer activation level of every input value."""
    levels: list[torch.Tensor] = []
    handles = []
    for module in qnet.modules():
        if isinstance(module, QConv2d):
            def hook(m: QConv2d, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0]
                bits = m.bits(x.shape[0]).reshape(-1, 1, 1, 1)
                aq = m.act_quant
                top = 2 ** bits - 1
                step = (aq.upper - aq.lower).clamp_min(1e-6) / top
                zero = torch.round(-aq.lower / step)
                q = torch.minimum(torch.maximum(torch.round(x / step), -zero), top - zero)
                levels.append(q.to(torch.int32))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = qnet(patches)
    finally:
        for h in handles:
            h.remove()
    return out, levels


def _grad(qnet: torch.nn.Module, patches: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    params = [p for n, p in qnet.named_parameters() if "_quant" in n]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    loss = F.l1_loss(qnet(patches), target)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True,
                        help="an EDSR x2 AdaBM W4A4 calibration record (adasr calibrate)")
    parser.add_argument("--patches", type=int, default=32)
    args = parser.parse_args()
    weights = shared("weights/edsr_r8f64_x2_krasserm.pt")
    record = read_record(args.record)
    patches = sample_patches(shared("calibration/sun_hays8"), args.patches, 48, 0, 2)
    fp = load_model(weights).model.eval()
    settings = {"2 threads, oneDNN": (2, True), "1 thread, oneDNN": (1, True),
                "2 threads, native conv": (2, False)}
    fp_out, q_out, levels, grads = {}, {}, {}, {}
    for name, (threads, mkldnn) in settings.items():
        with _setting(threads, mkldnn):
            with torch.no_grad():
                fp_out[name] = fp(patches)
            qnet = apply_record(load_model(weights), record)
            q_out[name], levels[name] = _levels(qnet, patches)
            grads[name] = _grad(qnet, patches, fp_out[name].detach())
    ref = next(iter(settings))
    lines = [f"{cpu_name()}, torch {torch.__version__}, record {args.record.name}, "
             f"{args.patches} calibration patches 48x48; reference: {ref}", ""]
    flips_threads = 0.0
    for name in list(settings)[1:]:
        d_fp = (fp_out[name] - fp_out[ref]).abs()
        total = sum(v.numel() for v in levels[ref])
        flips = sum(int((a != b).sum()) for a, b in zip(levels[name], levels[ref], strict=True))
        d_q = (q_out[name] - q_out[ref]).abs()
        g_ref, g = grads[ref], grads[name]
        rel = float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-12))
        line = (f"{name} vs {ref}: FP32 output max |diff| {float(d_fp.max()):.2e}, "
                f"{float((d_fp > 0).float().mean()):.1%} of values differ; quantized: "
                f"{flips / total:.4%} of activation levels flip ({flips} of {total}), output "
                f"max |diff| {float(d_q.max()):.2e}; loss-gradient relative difference {rel:.2e}")
        print(line, flush=True)
        lines.append("- " + line)
        if name.startswith("1 thread"):
            flips_threads = flips / total
    atomic_write_bytes(REPO / "benchmarks" / "results" / "calibration_noise.md",
                       ("\n".join(lines) + "\n").encode())
    print(f"flips={flips_threads:.6f}")


if __name__ == "__main__":
    main()

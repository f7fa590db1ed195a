"""Parameter averaging for the calibration's noisy Adam walk (Polyak / SWA style).

Straight-through rounding makes every step's gradient a noisy function of which quantization
levels flip, and the flips depend on float32 reduction order (threads, kernels: see
``benchmarks/calibration_noise.py``). The last iterate of such a walk is one random point of it;
the mean of its last steps is a stable one. Sums are kept in float64, so the mean does not depend on
the order of the additions beyond float64 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ParameterAverage:
    """Uniform running mean of ``params`` over the states offered by ``update``."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        self.count = 0

    def update(self) -> None:
        with torch.no_grad():
            for total, param in zip(self.sums, self.params, strict=True):
                total.add_(param.detach().double())
        self.count += 1

    def mean(self) -> list[Tensor]:
        """The averages, each in its parameter's dtype (the current values if nothing was
        offered)."""
        if not self.count:
            return [p.detach().clone() for p in self.params]
        return [(total / self.count).to(p.dtype) for total, p in
                zip(self.sums, self.params, strict=True)]

    def apply(self) -> None:
        """Load the averages into the parameters."""
        with torch.no_grad():
            for param, value in zip(self.params, self.mean(), strict=True):
                param.copy_(value)


def averaged_steps(steps: int, fraction: float) -> int:
    """How many of an epoch's last ``steps`` the average covers (0 when ``fraction`` is 0)."""
    return min(steps, round(steps * fraction))

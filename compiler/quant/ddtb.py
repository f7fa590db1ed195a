"""DDTB's dynamic gate controller: per-image scales for an activation quantizer's (l, u).

global average pool -> 2-bit 1x1 conv (C -> 32) -> BN -> ReLU -> 1x1 conv (32 -> 2) ->
``2 * sigmoid``. The last conv starts at zero so every gate starts as the identity (scales 1, 1).
Calibration batches are tiny (2 patches), so the BN statistics are measured once over all
calibration patches and then frozen (the paper trains them with large batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiler.quant.quantizers import quantize_weight, search_weight_clip

GATE_HIDDEN = 32
GATE_WEIGHT_BITS = 2


class DynamicGate(nn.Module):
    def __init__(self, channels: int, hidden: int = GATE_HIDDEN) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.norm = nn.BatchNorm2d(hidden)
        self.expand = nn.Conv2d(hidden, 2, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)
        clip = search_weight_clip(self.reduce.weight.detach(), GATE_WEIGHT_BITS, per_channel=False)
        self.reduce_clip = nn.Parameter(clip)
        self.norm.eval()

    def _hidden(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        weight = quantize_weight(self.reduce.weight, self.reduce_clip, GATE_WEIGHT_BITS)
        return F.conv2d(pooled, weight, self.reduce.bias)

    def init_norm(self, activations: Tensor) -> None:
        """Set (and freeze) the BN statistics from calibration activations ``[N, C, H, W]``."""
        with torch.no_grad():
            hidden = self._hidden(activations)
            self.norm.running_mean.copy_(hidden.mean(dim=(0, 2, 3)))
            self.norm.running_var.copy_(hidden.var(dim=(0, 2, 3), unbiased=False) + 1e-5)

    def train(self, mode: bool = True) -> DynamicGate:
        super().train(mode)
        self.norm.eval()  # statistics stay frozen
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Per-sample (scale_l, scale_u), shape ``[N, 2]``, each in (0, 2)."""
        hidden = F.relu(self.norm(self._hidden(x)))
        return 2 * torch.sigmoid(self.expand(hidden)).flatten(1)

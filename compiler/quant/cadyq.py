"""CADyQ's bit selector: per patch *and* per layer, one bit-width out of three candidates.

Each adaptive conv has its own selector (methods.md section 2, the released ``BitSelector``):
its input is the patch's mean image-gradient magnitude along x and y (``gradient_features``)
and the per-channel standard deviation of the layer's input, ``C + 2`` numbers; one linear layer
gives three logits, one per candidate bit-width ``base - 2 / base / base + 2``. Forward: hard
argmax; backward: through the softmax (the bits straight-through the softmax-weighted bits, and
in training the activation through the softmax-weighted mixture of the three quantized inputs).

Differences from the paper, all for calibration in minutes without HR:
- the features are standardized with their calibration mean / std (``mean``, ``scale``): Adam
  on raw features (gradients ~10-60, stds ~0.01-1) does not move in a few hundred steps;
- the linear layer starts content-aware instead of at the top bit-width: the score
  ``s = (mean of the two gradient z-scores + mean of the C std z-scores) / 2`` goes to the low
  candidate below its ``tail`` quantile over the calibration patches and to the high one above
  ``1 - tail`` (25% / 50% / 25% at init, so the calibration average starts at the base);
- one activation quantizer per layer (learned bounds shared by the three bit-widths, as AdaBM's
  adaptive layers share theirs), not one learned clip per candidate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CANDIDATES = 3
GRADIENT_FEATURES = 2  # mean |gradient| along x and along y
INIT_TAIL = 0.25  # calibration patches on the low / on the high candidate at init
INIT_SHARPNESS = 4.0  # logit per unit of score at init (softmax neither flat nor one-hot)


def candidate_bits(base: int, step: int = 2) -> tuple[int, int, int]:
    """The candidate bit-widths around ``base``: ``base - step, base, base + step``."""
    return (base - step, base, base + step)


def selector_features(grad: Tensor, x: Tensor) -> Tensor:
    """``[N, 2 + C]``: the image-gradient features and the per-channel std of ``x`` (detached:
    the selector reads the layer's input, it does not shape it)."""
    return torch.cat([grad, x.detach().std(dim=(2, 3))], dim=1)


class BitSelector(nn.Module):
    """``[N, 2 + C]`` features -> per-sample bits out of ``candidates`` (hard, straight-through)."""

    def __init__(self, channels: int, candidates: tuple[int, ...]) -> None:
        super().__init__()
        if len(candidates) != CANDIDATES:
            raise ValueError(f"a selector takes {CANDIDATES} candidate bit-widths")
        width = channels + GRADIENT_FEATURES
        self.linear = nn.Linear(width, CANDIDATES)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.register_buffer("candidates", torch.tensor([float(b) for b in candidates]))

    def logits(self, features: Tensor) -> Tensor:
        z = (features - self.mean) / self.scale
        return self.linear(z)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(bits ``[N]``: the argmax candidate forward, the softmax-weighted bits backward;
        softmax probabilities ``[N, 3]``; one-hot choice ``[N, 3]``)."""
        logits = self.logits(features)
        probs = F.softmax(logits, dim=1)
        choice = F.one_hot(logits.argmax(dim=1), CANDIDATES).to(probs.dtype)
        soft = probs @ self.candidates
        hard = choice @ self.candidates
        return soft + (hard - soft).detach(), probs, choice

    def init_from(self, features: Tensor, tail: float = INIT_TAIL,
                  sharpness: float = INIT_SHARPNESS) -> None:
        """Standardize on the calibration ``features`` ``[P, 2 + C]`` and start at the score's
        ``tail`` / ``1 - tail`` quantiles (see the module docstring)."""
        with torch.no_grad():
            mean = features.mean(dim=0)
            scale = features.std(dim=0).clamp_min(1e-6)
            channels = features.shape[1] - GRADIENT_FEATURES
            direction = torch.cat([torch.full((GRADIENT_FEATURES,), 0.5 / GRADIENT_FEATURES),
                                   torch.full((channels,), 0.5 / max(channels, 1))])
            score = ((features - mean) / scale) @ direction
            low = float(torch.quantile(score.double(), tail))
            high = float(torch.quantile(score.double(), 1 - tail))
            self.mean.copy_(mean)
            self.scale.copy_(scale)
            self.linear.weight.copy_(torch.stack([-direction, torch.zeros_like(direction),
                                                  direction]) * sharpness)
            self.linear.bias.copy_(torch.tensor([low, 0.0, -high]) * sharpness)

    def shift_(self, delta: float, middle: float = 0.0) -> None:
        """Move ``delta`` logits from the high candidate to the low one, and add ``middle`` to
        the base candidate's (the bit budget)."""
        with torch.no_grad():
            self.linear.bias += torch.tensor([delta, middle, -delta])


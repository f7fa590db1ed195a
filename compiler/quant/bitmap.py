"""AdaBM bit mapping: ``b(n, k) = base + d_img(n) + d_layer(k)``, both offsets in {-1, 0, +1}.

The image offset comes from the patch complexity statistic (PyTorch twin of
``runtime.statistic``, which the device uses; a test keeps their decisions identical) and two
learnable thresholds; the layer offset is one learnable scalar per adaptive layer. Both are hard
in the forward pass and differentiable through tanh surrogates in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LUMA = (0.299, 0.587, 0.114)
# the largest complexity of any image in [0, 1]: each normalized Sobel response is <= 0.5
COMPLEXITY_MAX = 500.0


def _sobel_x(padded: Tensor) -> Tensor:
    """Normalized Sobel-x of an edge-padded ``[N, H+2, W+2]`` image, computed separably.

    A central difference along x, then a [1, 2, 1] / 8 smoothing along y: the same arithmetic, in
    the same order, as ``runtime.statistic``, so a flat patch gives exactly 0 on both sides.
    """
    diff = padded[..., :, 2:] - padded[..., :, :-2]
    return (diff[..., :-2, :] + 2.0 * diff[..., 1:-1, :] + diff[..., 2:, :]) / 8.0


def complexity(x: Tensor) -> Tensor:
    """Patch complexity ``g`` per sample of an NCHW RGB batch in [0, 1] (shape ``[N]``).

    ``g = 1000 * mean(|Sobel_x(gray)| + |Sobel_y(gray)|) / 2`` with BT.601 luma, normalized
    (``/8``) Sobel kernels, replicate padding, and the mean over both directions and all pixels.
    Twin of ``runtime.statistic.complexity_batch`` (a test keeps their decisions identical).
    """
    mean_x, mean_y = _gradient_means(x)
    return 1000.0 * (mean_x + mean_y) / 2.0


def gradient_features(x: Tensor) -> Tensor:
    """``[N, 2]``: ``1000 * mean |Sobel_x(gray)|`` and ``1000 * mean |Sobel_y(gray)|`` per sample
    (CADyQ's image input to its bit selectors; ``complexity`` is their mean)."""
    mean_x, mean_y = _gradient_means(x)
    return 1000.0 * torch.stack([mean_x, mean_y], dim=1)


def _gradient_means(x: Tensor) -> tuple[Tensor, Tensor]:
    gray = _LUMA[0] * x[:, 0] + _LUMA[1] * x[:, 1] + _LUMA[2] * x[:, 2]
    padded = F.pad(gray.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    mean_x = _sobel_x(padded).abs().mean(dim=(1, 2))
    mean_y = _sobel_x(padded.transpose(1, 2)).abs().mean(dim=(1, 2))
    return mean_x, mean_y


def _hard_ste(hard: Tensor, soft: Tensor) -> Tensor:
    return soft + (hard - soft).detach()


class ImageToBit(nn.Module):
    """Two learnable thresholds on the complexity: ``d_img = -1 | 0 | +1``."""

    def __init__(self) -> None:
        super().__init__()
        self.lower = nn.Parameter(torch.tensor(0.0))
        self.upper = nn.Parameter(torch.tensor(1.0))

    def init_from(self, g: Tensor, tail: float = 0.1) -> None:
        """Thresholds at the ``tail`` / ``1 - tail`` quantiles of the calibration complexities
        (AdaBM: the 10th / 90th percentiles)."""
        with torch.no_grad():
            self.lower.fill_(float(torch.quantile(g.double(), tail)))
            self.upper.fill_(float(torch.quantile(g.double(), 1 - tail)))

    def forward(self, g: Tensor) -> Tensor:
        lower, upper = self.lower, self.upper
        hard = (g > upper).to(g.dtype) - (g < lower).to(g.dtype)
        width = (upper - lower).clamp_min(1e-6)
        soft = torch.tanh((g - (upper + lower) / 2) * 2 / width)
        return _hard_ste(hard, soft)


class LayerToBit(nn.Module):
    """One learnable scalar per adaptive layer: ``d_layer = round(clamp(m, -1, 1))``."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.offsets = nn.Parameter(torch.zeros(count))

    def init_from(self, sensitivities: Tensor) -> None:
        """-1 below the 30th percentile of the layers' input std, +1 above the 70th, else 0."""
        with torch.no_grad():
            low = torch.quantile(sensitivities.double(), 0.3).to(sensitivities.dtype)
            high = torch.quantile(sensitivities.double(), 0.7).to(sensitivities.dtype)
            init = (sensitivities > high).float() - (sensitivities < low).float()
            self.offsets.copy_(init)

    def forward(self) -> Tensor:
        hard = torch.round(self.offsets.clamp(-1, 1))
        return _hard_ste(hard, torch.tanh(self.offsets))

    def hard(self) -> list[int]:
        return [int(v) for v in torch.round(self.offsets.detach().clamp(-1, 1)).tolist()]

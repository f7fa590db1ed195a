"""Granular-DQ's bit budget: the two complexity thresholds that fit ``base - margin``.

Granular-DQ gives a patch one bit-width for every adaptive layer, ``base - step / base / base +
step`` by its complexity ``g`` against two thresholds. Training holds the *calibration* average
at the base (the hinge); busier content (whole benchmark images, complexity 16-58 against a
calibration median near 26 at x2) then runs above it. The budget re-places both thresholds on
the calibration patches, as AdaBM's ``Calibrator.fit_budget`` lowers layers and CADyQ's
``fit_selector_budget`` shifts selectors:

* a patch's loss at each class is exact and independent of every other patch (one bit-width per
  patch, no layer interaction), so the per-patch L1 to the FP outputs at the three classes,
  measured once (three passes), prices every threshold pair;
* the thresholds are monotone in ``g``: a pair puts the ``k_low`` flattest patches in the low
  class and the ``k_high`` busiest in the high one; the budget takes the pair of least total L1
  whose calibration FAB ``base + step * (k_high - k_low) / P`` is ``<= base - margin``;
* each threshold sits midway between the two calibration complexities it separates; a class with
  no calibration patch is off (lower threshold 0, upper :data:`COMPLEXITY_MAX`): content busier
  than every calibration patch is not sent to a class the calibration never priced.

Decided on the calibration patches only. AdaBM without layer offsets (its default at a base of
<= 4 bits, ``CalibrationConfig.layer_offsets``) is the same per-patch structure with a step of
1 bit, and takes the same budget; layer offsets, where a network has them, shift every patch's
bits by their mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from compiler.quant.bitmap import COMPLEXITY_MAX, complexity
from compiler.quant.qmodel import QuantizedSR
from runtime.errors import CalibrationError


@dataclass(frozen=True)
class ThresholdBudget:
    """What the budget chose (the record's ``calibration.threshold_budget``)."""

    target: float  # base - margin
    learned: tuple[float, float]  # the trained thresholds
    thresholds: tuple[float, float]  # the budget's (the record's image_thresholds)
    classes: tuple[int, int, int]  # calibration patches in the low / base / high class
    fab: float  # over all calibration patches
    l1: float  # mean per-patch L1 to the FP outputs at the chosen classes
    learned_fab: float
    learned_l1: float

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def fp_outputs(qnet: QuantizedSR, patches: Tensor) -> Tensor:
    """The full-precision network's outputs (quantization off), in chunks."""
    qnet.context.enabled = False
    try:
        return qnet.forward_chunked(patches)
    finally:
        qnet.context.enabled = True


def class_losses(qnet: QuantizedSR, patches: Tensor, reference: Tensor) -> Tensor:
    """``[P, 3]``: each patch's mean L1 to ``reference`` (the FP outputs) at ``d_img = -1, 0, +1``.
    """
    losses = []
    kept = qnet.forced_d_img
    try:
        for d in (-1, 0, 1):
            qnet.forced_d_img = d
            out = qnet.forward_chunked(patches)
            losses.append((out - reference).abs().flatten(1).mean(dim=1))
    finally:
        qnet.forced_d_img = kept
    return torch.stack(losses, dim=1)


def _between(sorted_g: Tensor, below: int) -> float:
    """A threshold with exactly ``below`` of ``sorted_g`` under it (strictly between neighbours).
    """
    return float((sorted_g[below - 1] + sorted_g[below]) / 2)


def thresholds_for(sorted_g: Tensor, low: int, high: int) -> tuple[float, float]:
    """The (lower, upper) pair that puts the ``low`` flattest / ``high`` busiest of ``sorted_g``
    (ascending) in the low / high class; an empty class is off."""
    count = sorted_g.numel()
    lower = 0.0 if low == 0 else (COMPLEXITY_MAX if low == count else _between(sorted_g, low))
    upper = COMPLEXITY_MAX if high == 0 else (-1.0 if high == count
                                              else _between(sorted_g, count - high))
    return lower, upper


def fit_threshold_budget(qnet: QuantizedSR, patches: Tensor, reference: Tensor,
                         target: float) -> ThresholdBudget:
    """Place ``qnet``'s two image thresholds: the least-L1 pair with calibration FAB <= ``target``
    (see the module docstring); applies them and returns what it chose."""
    settings = qnet.settings
    if not settings.adaptive:
        raise CalibrationError("the threshold budget needs bits chosen from the patch complexity "
                               f"(adabm, granular); got method {settings.method!r}")
    # AdaBM's layer offsets (all 0 when they are off, and for Granular-DQ) shift every patch alike
    base = float(settings.abits) + float(qnet.layer_offsets().detach().mean())
    step = float(settings.image_step)
    g = complexity(patches).double()
    order = g.argsort()
    sorted_g = g[order]
    losses = class_losses(qnet, patches, reference).double()[order]  # [P, 3] ascending g
    count = g.numel()
    itb = qnet.image_to_bit
    learned = (itb.lower.item(), itb.upper.item())
    learned_d = ((g > learned[1]).double() - (g < learned[0]).double()).long()
    learned_fab = base + step * float(learned_d.double().mean())
    learned_l1 = float(losses[torch.arange(count), (learned_d[order] + 1)].mean())
    zero = torch.zeros(1, dtype=torch.float64)
    low_gain = torch.cat([zero, (losses[:, 0] - losses[:, 1]).cumsum(0)])  # k flattest -> low
    high_gain = torch.cat([zero, (losses[:, 2] - losses[:, 1]).flip(0).cumsum(0)])  # busiest
    k = torch.arange(count + 1)
    k_low, k_high = k[:, None], k[None, :]
    cost = losses[:, 1].sum() + low_gain[:, None] + high_gain[None, :]
    fab = base + step * (k_high - k_low).double() / count
    # a split inside a run of equal complexities cannot be drawn by a threshold
    split = torch.ones(count + 1, dtype=torch.bool)
    split[1:count] = sorted_g[1:] > sorted_g[:-1]
    allowed = ((k_low + k_high <= count) & (fab <= target + 1e-9) & split[:, None]
               & split.flip(0)[None, :])
    if not bool(allowed.any()):
        raise CalibrationError(f"no threshold pair reaches a calibration FAB <= {target:g} "
                               f"(lowest: {base - step:g}); lower the bit margin")
    best = int(torch.where(allowed, cost, torch.full_like(cost, torch.inf)).argmin())
    low, high = divmod(best, count + 1)
    lower, upper = thresholds_for(sorted_g, low, high)
    with torch.no_grad():
        itb.lower.fill_(lower)
        itb.upper.fill_(upper)
    return ThresholdBudget(target=target, learned=learned, thresholds=(lower, upper),
                           classes=(low, count - low - high, high),
                           fab=float(fab[low, high]), l1=float(cost[low, high]) / count,
                           learned_fab=learned_fab, learned_l1=learned_l1)

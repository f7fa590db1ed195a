"""CADyQ's bit budget: a logit shift and a pull toward the base, shared by every selector, that
fit ``base - margin`` at the least calibration L1.

The selectors train with the bit hinge at the base on the calibration patches; busier content
(whole benchmark images) then runs above it. The budget moves every selector's logits by the
same two amounts (``BitSelector.shift_``): ``shift`` from the high candidate to the low one, and
``middle`` onto the base candidate, as AdaBM's ``Calibrator.fit_budget`` lowers layers and
Granular-DQ's ``compiler.quant.granular`` re-places its thresholds. Decided on the calibration
patches only:

* for each ``middle`` of :data:`MIDDLE_PULLS` the shift is the one that puts the calibration FAB
  at the largest value <= the target (searched on the logits of one pass, each layer's features
  held at the unshifted network's);
* of those pairs, the one whose network is closest to the FP outputs (mean L1 over the
  calibration patches, one pass each) is kept.

What it finds (EDSR x2, seed 0, 2 threads, budgeted to the base as CADyQ is by default): the
calibration L1 falls with every pull, so the budget takes the strongest and sends nearly every
layer-patch to the base (W4A4: L1 3.56e-3 with the shift alone, 3.24e-3 at pull 16; W8A6: 1.64e-3
and 1.20e-3; the record's ``calibration.selector_budget.tried``). At a fixed average, a
layer-patch 2 bits lower costs more than one 2 bits higher gains, as Granular-DQ's budget found
per patch. Whole images then run at the base (``benchmarks/results/dyn_edsr_cadyq*.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from compiler.quant.qmodel import FORWARD_CHUNK, QuantizedSR

MIDDLE_PULLS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)  # logits added to every selector's base candidate
_SEARCH_LIMIT = 1e4  # |shift| the bracketing search gives up at


@dataclass(frozen=True)
class SelectorBudget:
    """What the budget chose (the record's ``calibration.selector_budget``)."""

    target: float  # base - margin
    middle: float  # logits added to the base candidate
    shift: float  # logits moved from the high candidate to the low one
    fab: float  # calibration FAB of the chosen pair (held features)
    l1: float  # its mean L1 to the FP outputs over the calibration patches
    tried: tuple[tuple[float, float, float, float], ...]  # (middle, shift, fab, l1) per pull

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tried"] = [list(t) for t in self.tried]
        return data


def _selector_logits(qnet: QuantizedSR, patches: Tensor) -> Tensor:
    """``[L, P, 3]``: every selector's logits on ``patches`` (one pass)."""
    selectors = [conv.selector for _, conv in qnet.qconvs() if conv.selector is not None]
    logits: list[list[Tensor]] = [[] for _ in selectors]
    handles = []
    for index, selector in enumerate(selectors):
        def keep(_m: nn.Module, _i: Any, out: Tensor, index: int = index) -> None:
            logits[index].append(out.detach())
        handles.append(selector.linear.register_forward_hook(keep))
    try:
        with torch.no_grad():
            for chunk in patches.split(FORWARD_CHUNK):
                qnet(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([torch.cat(chunks) for chunks in logits])


def _fitting_shift(fab: Callable[[float], float], target: float) -> float:
    """The shift whose ``fab(shift)`` (non-increasing in it) is the largest value <= ``target``."""
    if fab(0.0) <= target:  # the largest FAB <= target lies at a shift <= 0
        low, high = -1.0, 0.0
        while fab(low) <= target and low > -_SEARCH_LIMIT:
            low, high = low * 2, low
    else:
        low, high = 0.0, 1.0
        while fab(high) > target and high < _SEARCH_LIMIT:
            low, high = high, high * 2
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (low, middle) if fab(middle) <= target else (middle, high)
    return high


def _l1(qnet: QuantizedSR, patches: Tensor, reference: Tensor) -> float:
    return float((qnet.forward_chunked(patches) - reference).abs().mean())


def fit_selector_budget(qnet: QuantizedSR, patches: Tensor, reference: Tensor,
                        target: float, pulls: tuple[float, ...] = MIDDLE_PULLS) -> SelectorBudget:
    """CADyQ's bit budget (see the module docstring): applies the (middle, shift) pair of least
    calibration L1 to ``reference`` (the FP outputs of ``patches``) among those whose calibration
    FAB is the largest value <= ``target``, and returns what it chose. A shift may be negative
    (toward the high candidates) when the hinge left bits unused below the target. Training does
    not depend on the budget, so a record calibrated with no budget gives any target's record
    through this function."""
    selectors = [conv.selector for _, conv in qnet.qconvs() if conv.selector is not None]
    scores = _selector_logits(qnet, patches)  # [L, P, 3]
    candidates = torch.stack([s.candidates for s in selectors])  # [L, 3]
    trained = [s.linear.bias.detach().clone() for s in selectors]
    tried = []
    for middle in pulls:
        def fab(shift: float, middle: float = middle) -> float:
            choice = (scores + torch.tensor([shift, middle, -shift])).argmax(dim=2)  # [L, P]
            return float(candidates.gather(1, choice).mean())

        shift = _fitting_shift(fab, target)
        for selector in selectors:
            selector.shift_(shift, middle)
        tried.append((middle, shift, fab(shift), _l1(qnet, patches, reference)))
        with torch.no_grad():
            for selector, bias in zip(selectors, trained, strict=True):
                selector.linear.bias.copy_(bias)
    middle, shift, fab_chosen, l1 = min(tried, key=lambda t: t[3])
    for selector in selectors:
        selector.shift_(shift, middle)
    return SelectorBudget(target, middle, shift, fab_chosen, l1, tuple(tried))

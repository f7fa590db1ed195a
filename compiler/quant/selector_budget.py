"""CADyQ's bit budget: one logit shift, shared by every selector, that fits ``base - margin``.

The selectors train with the bit hinge at the base on the calibration patches; busier content
(whole benchmark images) then runs above it. The budget moves every selector's logits between
its high candidate and its low one by the same amount (``BitSelector.shift_``), as AdaBM's
``Calibrator.fit_budget`` lowers layers and Granular-DQ's ``compiler.quant.granular`` re-places
its thresholds. Decided on the calibration patches only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from compiler.quant.qmodel import FORWARD_CHUNK, QuantizedSR


def fit_selector_budget(qnet: QuantizedSR, patches: Tensor, target: float) -> float:
    """CADyQ's bit budget: the logit shift (high candidate -> low one, the same for every selector,
    see ``BitSelector.shift_``) that puts the FAB of ``patches`` at the largest value <=
    ``target``: positive when training left it above, negative (toward the high candidates) when
    the hinge left bits unused below it (EDSR x2 W8A6: 5.83 after training). The room below the
    base is for content busier than the calibration patches, as AdaBM's ``Calibrator.fit_budget``.
    Training does not depend on it, so a record calibrated with no budget gives any target's
    record through this function.

    The shift is searched on the logits of one pass (each layer's features held at the unshifted
    network's), then applied to ``qnet``; returns it."""
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
    scores = torch.stack([torch.cat(chunks) for chunks in logits])  # [L, P, 3]
    candidates = torch.stack([s.candidates for s in selectors])  # [L, 3]

    def fab(delta: float) -> float:
        shifted = scores + torch.tensor([delta, 0.0, -delta])
        choice = shifted.argmax(dim=2)  # [L, P]
        return float(candidates.gather(1, choice).mean())

    if fab(0.0) <= target:  # the largest FAB <= target lies at a shift <= 0
        low, high = -1.0, 0.0
        while fab(low) <= target and low > -1e4:
            low, high = low * 2, low
    else:
        low, high = 0.0, 1.0
        while fab(high) > target and high < 1e4:
            low, high = high, high * 2
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (low, middle) if fab(middle) <= target else (middle, high)
    for selector in selectors:
        selector.shift_(high)
    return high

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
  held at the unshifted network's); held features are exact for the first selector only
  (shifting a layer's bits changes the inputs, so the features, of the layers after it), so the
  shift is then settled: while the network's own FAB on the patches is above the target, it is
  re-fitted on logits taken at the shifted network (``SETTLE_PASSES`` at most), and if that
  circles, bisected on the network's own FAB;
* of those pairs, all at a real FAB <= the target, the one whose network is closest to the FP
  outputs (mean L1 over the calibration patches, one pass each) is kept. Unsettled, the pairs
  were compared at different real FABs (IMDN x4 W4A4, seed 0: the pull of 4 won at 4.12 against
  the target 4.00).

What it found (EDSR x2, seed 0, 2 threads, budgeted to the base as CADyQ is by default; stop
24's records, before the settling): the calibration L1 falls with every pull, so the budget
takes the strongest and sends nearly every
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

from compiler.quant.cadyq import BitSelector
from compiler.quant.qmodel import FORWARD_CHUNK, QuantizedSR

MIDDLE_PULLS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)  # logits added to every selector's base candidate
_SEARCH_LIMIT = 1e4  # |shift| the bracketing search gives up at
SETTLE_PASSES = 4  # re-fits of the chosen shift on the shifted network's own logits
FAB_TOLERANCE = 1e-6  # float slack of the real FAB against the target
REAL_SEARCH_STEPS = 12  # bisection steps of the last resort (one forward pass each)


@dataclass(frozen=True)
class SelectorBudget:
    """What the budget chose (the record's ``calibration.selector_budget``)."""

    target: float  # base - margin
    middle: float  # logits added to the base candidate
    shift: float  # logits moved from the high candidate to the low one
    fab: float  # calibration FAB of the chosen pair, settled (the network's own)
    l1: float  # its mean L1 to the FP outputs over the calibration patches
    tried: tuple[tuple[float, float, float, float], ...]  # (middle, shift, fab, l1) per pull,
    # each settled

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tried"] = [list(t) for t in self.tried]
        return data


@dataclass(frozen=True)
class _Pass:
    """One no-grad pass of the selector network over the calibration patches."""

    logits: Tensor  # [L, P, 3]: every selector's logits
    fab: float  # the network's own FAB
    l1: float | None  # mean L1 to the reference outputs, if one was given


def _pass(qnet: QuantizedSR, patches: Tensor, reference: Tensor | None = None) -> _Pass:
    """Logits, FAB and L1 of ``patches`` from one forward pass, ``FORWARD_CHUNK`` at a time."""
    selectors = [conv.selector for _, conv in qnet.qconvs() if conv.selector is not None]
    logits: list[list[Tensor]] = [[] for _ in selectors]
    handles = []
    for index, selector in enumerate(selectors):
        def keep(_m: nn.Module, _i: Any, out: Tensor, index: int = index) -> None:
            logits[index].append(out.detach())
        handles.append(selector.linear.register_forward_hook(keep))
    bits, outputs = [], []
    try:
        with torch.no_grad():
            for chunk in patches.split(FORWARD_CHUNK):
                outputs.append(qnet(chunk))
                bits.append(qnet.sample_bits())
    finally:
        for handle in handles:
            handle.remove()
    l1 = None if reference is None else float((torch.cat(outputs) - reference).abs().mean())
    return _Pass(torch.stack([torch.cat(chunks) for chunks in logits]),
                 float(torch.cat(bits).mean()), l1)


def _fitting_shift(fab: Callable[[float], float], target: float, steps: int = 30) -> float:
    """The shift whose ``fab(shift)`` (non-increasing in it) is the largest value <= ``target``
    (``steps`` bisection steps)."""
    if fab(0.0) <= target:  # the largest FAB <= target lies at a shift <= 0
        low, high = -1.0, 0.0
        while fab(low) <= target and low > -_SEARCH_LIMIT:
            low, high = low * 2, low
    else:
        low, high = 0.0, 1.0
        while fab(high) > target and high < _SEARCH_LIMIT:
            low, high = high, high * 2
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if fab(middle) <= target else (middle, high)
    return high


def _held_fab(scores: Tensor, candidates: Tensor, middle: float) -> Callable[[float], float]:
    """The FAB of ``scores`` (``[L, P, 3]`` logits) as a function of the shift, with ``middle``
    added to the base candidate, every layer's features held."""
    def fab(shift: float) -> float:
        choice = (scores + torch.tensor([shift, middle, -shift])).argmax(dim=2)  # [L, P]
        return float(candidates.gather(1, choice).mean())
    return fab


def fit_selector_budget(qnet: QuantizedSR, patches: Tensor, reference: Tensor,
                        target: float, pulls: tuple[float, ...] = MIDDLE_PULLS) -> SelectorBudget:
    """CADyQ's bit budget (see the module docstring): applies the (middle, shift) pair of least
    calibration L1 to ``reference`` (the FP outputs of ``patches``) among those whose calibration
    FAB is the largest value <= ``target``, and returns what it chose. A shift may be negative
    (toward the high candidates) when the hinge left bits unused below the target. Training does
    not depend on the budget, so a record calibrated with no budget gives any target's record
    through this function."""
    selectors = [conv.selector for _, conv in qnet.qconvs() if conv.selector is not None]
    scores = _pass(qnet, patches).logits  # [L, P, 3]
    candidates = torch.stack([s.candidates for s in selectors])  # [L, 3]
    trained = [s.linear.bias.detach().clone() for s in selectors]
    tried, states = [], []
    for middle in pulls:
        shift = _fitting_shift(_held_fab(scores, candidates, middle), target)
        for selector in selectors:
            selector.shift_(shift, middle)
        shift += _settle(qnet, selectors, candidates, patches, target)
        settled = _pass(qnet, patches, reference)
        assert settled.l1 is not None
        tried.append((middle, shift, settled.fab, settled.l1))
        # kept as they are: the shift sits within float rounding of a flip, so re-adding it
        # to the trained biases need not give the same choices
        states.append([selector.linear.bias.detach().clone() for selector in selectors])
        _set_biases(selectors, trained)
    best = min(range(len(tried)), key=lambda k: tried[k][3])
    _set_biases(selectors, states[best])
    middle, shift, fab_chosen, l1 = tried[best]
    return SelectorBudget(target, middle, shift, fab_chosen, l1, tuple(tried))


def _set_biases(selectors: list[BitSelector], biases: list[Tensor]) -> None:
    with torch.no_grad():
        for selector, bias in zip(selectors, biases, strict=True):
            selector.linear.bias.copy_(bias)


def _settle(qnet: QuantizedSR, selectors: list[BitSelector], candidates: Tensor, patches: Tensor,
            target: float) -> float:
    """Re-fit the shift on logits taken at the shifted network, ``SETTLE_PASSES`` times at most,
    until its real FAB is <= ``target``; the shift added. The held-feature search is exact
    for the first selector only: shifting earlier layers' bits changes later layers' inputs,
    and with them their selectors' features (IMDN x4 W4A4 CADyQ, seed 0: held 4.00, real
    4.12 on the calibration patches before this)."""
    added = 0.0
    for _ in range(SETTLE_PASSES):
        now = _pass(qnet, patches)
        if now.fab <= target + FAB_TOLERANCE:
            return added
        delta = _fitting_shift(_held_fab(now.logits, candidates, 0.0), target)
        for selector in selectors:
            selector.shift_(delta)
        added += delta
    if _pass(qnet, patches).fab <= target + FAB_TOLERANCE:
        return added
    # the re-fits went round in circles (a flip downstream undoing the one upstream): bisect
    # the shift on the network's own FAB, one pass per probe
    biases = [selector.linear.bias.detach().clone() for selector in selectors]

    def real_fab(delta: float) -> float:
        for selector in selectors:
            selector.shift_(delta)
        fab = _pass(qnet, patches).fab
        _set_biases(selectors, biases)
        return fab

    delta = _fitting_shift(real_fab, target + FAB_TOLERANCE, REAL_SEARCH_STEPS)
    for selector in selectors:
        selector.shift_(delta)
    return added + delta

"""AdaBM / Granular-DQ / DDTB calibration and static PTQ baselines, from a few unlabeled LR patches.

Stages (AdaBM, methods.md section 1):
0. one FP pass over the patches collects the teacher outputs and block features (computed once
   and reused by every step), per-layer activation ranges (EMA of batch min/max, beta 0.9),
   per-layer input std, the patch complexities and the gate ranking (DDTB);
1. init: weight clips by MSE search, image thresholds at the 10th/90th complexity percentiles, layer
   offsets from the std percentiles (30th/70th), activation bounds from the ranges followed by
   bit-aware clipping (BaC; by default only at a base of <= 4 bits, see
   ``Calibrator._bit_aware_clipping``). The ranges are the global min/max over all calibration
   patches by default (``range_init="global"``); the paper's EMA of batch ranges (``"ema"``)
   under-covers the sharper content of test images when the calibration set is a few smooth photos
   (EDSR x2 W8A6, Set5: 37.760 dB global vs 37.741 dB EMA, FP 37.801). The activation bounds learn
   at lr 0.001, not the paper's 0.01, for the same reason (W4A4 Set5: 37.378 vs 37.237 dB).
   ``"percentile"`` starts at the 0.1% / 99.9% percentiles, which suits IMDN at 4 bits (x4 W4A4
   Set5 -2.09 dB against -4.05 with global) and not EDSR (x2 W4A4 -0.57 against -0.34); the
   L1 at init is lower with it for both, so it cannot choose, and it is an option, not a default.
   Like DDTB's, it applies to the adaptive layers; fixed 8-bit ones keep the full range;
2. ``steps`` Adam steps on the quantization parameters only (the conv weights never change) with
   ``L1(SR_q, SR_fp) + 10 * L_skt + 50 * max(avg_bit - base, 0)``, StepLR(0.9) per epoch. The
   ``cyclic`` schedule trains one parameter group per epoch (weight clips -> activation bounds ->
   bit mapping, the released code's order); ``joint`` trains all at once (EDSR x2 W8A6: FAB 5.76 /
   5.63 on Set5 / Set14 but -0.074 / -0.158 dB, against cyclic's 6.20 / 6.07 and -0.002 / -0.066
   dB). After every epoch the loss on the first ``validation`` calibration patches (not held out: a
   guard against divergence, not a generalization estimate) decides whether the state is the best so
   far; the best state is kept (the guard against the known clip divergence, with the clips bounded
   after each step). ``holdout`` > 0 validates instead on that many extra crops that are never
   trained on (the budget's choices of stage 3 too). ``average`` > 0 ends each epoch with the weight
   clips and activation bounds it trained at their mean over its last ``average`` fraction of
   steps (``compiler.quant.averaging``): straight-through rounding makes the walk noisy, and the
   noise depends on float32 reduction order (threads, kernels), so the last step's values are one
   random point of it. The holdout is off by default. The average is on by default (0.5) for the
   bit-adaptive methods at a base of <= 4 bits, where it narrows the spread over seeds and
   machines (``Calibrator.averaged_fraction``); with layer offsets at W4A4 (3-bit layers, and
   the holdout) it had measured -0.429 / -0.465 dB (seeds 0 / 1), no better than without.
3. the bit budget (``bit_margin``, default 0.15; not in the paper): layers are lowered one bit
   at a time, the one whose lower bit-width costs the least L1 to the FP outputs first, until the
   mean layer offset is <= -margin (``Calibrator.fit_budget``). The paper's hinge holds the
   average bits at the base on the calibration *patches*, whose flattest 10% take ``d_img = -1``;
   whole benchmark images never get that low (Set5 / Set14 complexities 16-58 against a lower
   threshold near 4) while the busiest reach +1, so the learned mapping ran FAB 6.20 / 6.14 on
   Set5 / Set14 at W8A6 (EDSR x2). With the margin: 6.01 / 5.96 at -0.008 / -0.030 dB. Pushing
   the hinge below the base instead (target ``base - margin``) overshoots: Adam moves every layer
   offset alike, so they round down together (margin 0.25: FAB 5.58, W4A4 -0.72 dB).
   At a base of 4 bits or fewer the layer offsets are off by default (``layer_offsets``, not in
   the paper): every layer runs at ``base + d_img`` and the margin re-places the image thresholds
   instead (Granular-DQ's budget, ``compiler.quant.granular``). With them, the budget put 3 of
   EDSR x2's 16 layers at 3 bits, and their activation bounds made the result depend on the seed
   and the machine's float reduction order (W4A4 Set5 -0.417 / -0.438 / -0.437 dB over seeds
   0-2 at 2 threads, -0.351 at 1 thread); without them: -0.236 / -0.276 / -0.258 dB at FAB 4.00.
4. refinement (``refine_steps``, not in the paper): the budget lowers layers after their bounds
   and clips were trained at the higher bits; BaC again at the lowered bits, then the bounds and
   clips train on with the mapping frozen (``Calibrator.refine``).
Granular-DQ (``granular``): one bit-width per patch for every adaptive layer, ``base - 2 / base /
base + 2`` (the paper's coarse 4 / 6 / 8 at base 6) from the same complexity statistic, thresholds
at the 25th / 75th percentiles (the calibration average at the base), trained like AdaBM's image
thresholds; no layer offsets. Its bit budget (``compiler.quant.granular``) re-places both
thresholds: the pair of least calibration L1 whose calibration FAB is <= ``base - bit_margin``.
Bit-aware clipping applies at the base as for AdaBM. The paper's fine split of the 8-bit class
into 4 / 5 / 8 is not implemented.
CADyQ (``cadyq``): a bit selector per adaptive layer picks ``base - 2 / base / base + 2`` per patch
from the image gradients and the per-channel std of the layer's input (``compiler.quant.cadyq``).
Trained here without HR, like AdaBM: distilled from the FP network on the calibration patches
(the same loss, the bit hinge holding the average at the base), the selectors in the mapping
epochs at ``lr_selector``; activation bounds bit-aware clipped at the base like AdaBM's, and
trained (with the weight clips) with every selector layer at the base (``Calibrator.
_training_bits``; the joint schedule trains them through each sample's chosen bits,
``QConv2d._select_and_quantize``). Its bit
budget (``compiler.quant.selector_budget``) moves every selector's logits by one shared shift
between the high candidate and the low one, and one shared pull onto the base candidate, to the
pair of least calibration L1 whose calibration FAB is just <= ``base - bit_margin``; its
margin is 0 by default (``Calibrator.bit_margin``), the budget then holding the base.
Static baselines (``minmax``, ``percentile``) stop after stage 1, at uniform bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiler.quant.averaging import ParameterAverage, averaged_steps
from compiler.quant.bitmap import complexity, gradient_features
from compiler.quant.ddtb import DynamicGate
from compiler.quant.granular import fit_threshold_budget
from compiler.quant.patches import list_images, sample_patches
from compiler.quant.qmodel import FIXED_BITS, FORWARD_CHUNK, QConv2d, QuantizedSR, QuantSettings
from compiler.quant.record import MAX_CLUSTERS, record_of
from compiler.quant.selector_budget import fit_selector_budget
from compiler.zoo.base import LoadedModel
from runtime.errors import CalibrationError, ConfigError, unknown_name

SCHEDULES = ("cyclic", "joint")
RANGE_INITS = ("global", "ema", "percentile")
BAC_MODES = ("auto", "on", "off")
BAC_AUTO_BITS = 4  # bit-aware clipping by default only at this base activation width or below
LAYER_OFFSET_MODES = ("auto", "on", "off")
LAYER_OFFSETS_AUTO_BITS = 4  # AdaBM's layer offsets by default only above this base width
GATED_FRACTION = {"edsr": 0.3, "rdn": 0.5, "srresnet": 0.1}
STATIC_PERCENTILE = 0.001  # the 'percentile' baseline clips 0.1% of values at each end
AVERAGED_GROUPS = ("weight", "act")  # parameter groups that CalibrationConfig.average averages
BIT_MARGIN_DEFAULT = 0.15  # CalibrationConfig.bit_margin by default ...
BIT_MARGIN_DEFAULTS = {"cadyq": 0.0}  # ... except for these methods (Calibrator.bit_margin)
AVERAGE_AUTO_BITS = 4  # CalibrationConfig.average by default only at this base width or below
AVERAGE_AUTO_FRACTION = 0.5  # ... over the last half of each epoch
AVERAGE_AUTO_METHODS = ("adabm", "granular", "cadyq")  # ... for the bit-adaptive methods


@dataclass(frozen=True)
class CalibrationConfig:
    patches: int = 100
    patch_size: int = 48
    steps: int = 500
    batch: int = 2
    epochs: int = 10
    seed: int = 0
    schedule: str = "cyclic"
    lr_weight_clip: float = 0.01
    lr_act: float = 0.001  # the paper's 0.01 over-fits the bounds to a few smooth photos
    lr_layer: float = 0.01
    lr_image: float = 0.1
    lr_selector: float = 0.01  # CADyQ's selectors (on standardized features)
    lr_gate: float = 0.01
    skt_weight: float = 10.0
    bit_weight: float = 50.0
    gamma: float = 0.9
    ema_beta: float = 0.9
    bac: str = "auto"
    layer_offsets: str = "auto"  # AdaBM: train per-layer offsets (auto: above a 4-bit base)
    range_init: str = "global"
    downscale: int = 1
    validation: int = 10
    bit_margin: float | None = None  # None: auto (Calibrator.bit_margin)
    refine_steps: int = 0
    clusters: int = 3  # CADyQ: configurations (engines) its selectors' choices are clustered into
    holdout: int = 0  # extra patches, never trained on, that validate (0: the first `validation`)
    average: float | None = None  # fraction of each epoch's last steps whose mean ends the
    # epoch (None: auto, Calibrator.averaged_fraction)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(unknown_name("schedule", self.schedule, SCHEDULES))
        if self.range_init not in RANGE_INITS:
            raise ConfigError(unknown_name("range init", self.range_init, RANGE_INITS))
        if self.bac not in BAC_MODES:
            raise ConfigError(unknown_name("bit-aware clipping mode", self.bac, BAC_MODES))
        if self.layer_offsets not in LAYER_OFFSET_MODES:
            raise ConfigError(unknown_name("layer offsets mode", self.layer_offsets,
                                           LAYER_OFFSET_MODES))
        if self.downscale < 1:
            raise ConfigError(f"downscale must be >= 1, got {self.downscale}")
        if self.bit_margin is not None and not 0 <= self.bit_margin <= 1:
            raise ConfigError(f"bit margin must be in [0, 1] bits, got {self.bit_margin}")
        if not 1 <= self.clusters <= MAX_CLUSTERS:
            raise ConfigError(f"clusters must be 1..{MAX_CLUSTERS} (one engine per runtime "
                              "image class), "
                              f"got {self.clusters}")
        if self.refine_steps < 0:
            raise ConfigError(f"refine steps must be >= 0, got {self.refine_steps}")
        if self.holdout < 0 or self.holdout == 1:
            raise ConfigError(f"held-out patches must be 0 (validate on the first --validation "
                              f"calibration patches) or >= 2, got {self.holdout}")
        if self.average is not None and not 0 <= self.average <= 1:
            raise ConfigError(f"the averaged fraction of an epoch must be in [0, 1], "
                              f"got {self.average}")
        if self.patches < 2 or self.patch_size < 8 or self.batch < 1 or self.epochs < 1:
            raise ConfigError(f"calibration needs >= 2 patches of >= 8 px, batch >= 1, epochs >= 1;"
                              f" got patches={self.patches} patch_size={self.patch_size} "
                              f"batch={self.batch} epochs={self.epochs}")


@dataclass
class LayerStats:
    """What the FP pass measured at one quantized conv's input."""

    ema_min: float | None = None
    ema_max: float | None = None
    global_min: float = math.inf
    global_max: float = -math.inf
    stds: list[Tensor] = field(default_factory=list)
    channel_stds: list[Tensor] = field(default_factory=list)  # [N, C] per batch (CADyQ)
    sample_max: list[Tensor] = field(default_factory=list)
    sample_min: list[Tensor] = field(default_factory=list)
    first_batch: Tensor | None = None  # a subsample of values, for percentiles and BaC
    pooled: list[Tensor] = field(default_factory=list)
    out_min: float = math.inf  # the conv's output range (for an engine's Q after the conv)
    out_max: float = -math.inf

    def update(self, x: Tensor, beta: float, generator: torch.Generator) -> None:
        lo, hi = float(x.min()), float(x.max())
        self.ema_min = lo if self.ema_min is None else beta * self.ema_min + (1 - beta) * lo
        self.ema_max = hi if self.ema_max is None else beta * self.ema_max + (1 - beta) * hi
        self.global_min, self.global_max = min(self.global_min, lo), max(self.global_max, hi)
        flat = x.flatten(1)
        self.stds.append(flat.std(dim=1))
        self.channel_stds.append(x.std(dim=(2, 3)))
        self.sample_max.append(flat.amax(dim=1))
        self.sample_min.append(flat.amin(dim=1))
        values = x.flatten()
        pick = torch.randint(values.numel(), (min(values.numel(), 65536),), generator=generator)
        subsample = values[pick]
        if self.first_batch is None:
            self.first_batch = subsample
        self.pooled.append(subsample)

    @property
    def sensitivity(self) -> float:
        return float(torch.cat(self.stds).mean())

    @property
    def dynamic_intensity(self) -> float:
        return float(torch.cat(self.sample_max).var() + torch.cat(self.sample_min).var())


@dataclass(frozen=True)
class Teacher:
    """FP outputs and block features of every calibration patch (computed once)."""

    outputs: Tensor
    features: list[Tensor]
    complexities: Tensor
    gradients: Tensor  # [P, 2] CADyQ's image-gradient features

    def subset(self, index: Tensor) -> Teacher:
        return Teacher(self.outputs[index], [f[index] for f in self.features],
                       self.complexities[index], self.gradients[index])


@dataclass(frozen=True)
class Validation:
    """The patches whose loss picks the best state and the budget's layers, with their teacher."""

    patches: Tensor
    teacher: Teacher
    held_out: bool  # False: the first ``validation`` calibration patches (also trained on)


@dataclass
class CalibrationResult:
    qnet: QuantizedSR
    record: dict[str, Any]


ProgressFactory = Callable[[int, str], Any]


class _BlockRecorder:
    """Forward hooks that keep the outputs of the feature blocks during one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: list[Tensor] = []
        self._handles = [model.get_submodule(n).register_forward_hook(self._keep) for n in names]

    def _keep(self, _module: nn.Module, _inputs: Any, output: Tensor) -> None:
        self.outputs.append(output)

    def take(self) -> list[Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Best:
    """The state with the lowest finite validation loss offered so far (and every loss)."""

    def __init__(self, snapshot: Callable[[], dict[str, Tensor]]) -> None:
        self.snapshot = snapshot
        self.loss, self.index = math.inf, 0
        self.history: list[float] = []
        self.state: dict[str, Tensor] = {}

    def offer(self, loss: float, index: int) -> None:
        self.history.append(loss)
        if not self.state or (math.isfinite(loss) and loss < self.loss):
            self.loss, self.index, self.state = loss, index, self.snapshot()


def _skt_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Mean L2 distance between Frobenius-normalized block outputs (per sample, per block)."""
    total = torch.zeros(())
    for s, t in zip(student, teacher, strict=True):
        s_n = F.normalize(s.flatten(1), dim=1)
        t_n = F.normalize(t.flatten(1), dim=1)
        total = total + (s_n - t_n).norm(dim=1).mean()
    return total / max(len(student), 1)


class Calibrator:
    def __init__(self, loaded: LoadedModel, settings: QuantSettings, config: CalibrationConfig,
                 progress: ProgressFactory | None = None) -> None:
        self.loaded = loaded
        self.settings = settings
        self.config = config
        self.progress = progress
        self.qnet = QuantizedSR(loaded.model, settings)
        self.blocks = list(loaded.model.feature_blocks())
        self.generator = torch.Generator().manual_seed(config.seed)
        self._stats: dict[str, LayerStats] | None = None
        self._validation: Validation | None = None

    # -- stage 0 -----------------------------------------------------------------------------
    def measure(self, patches: Tensor) -> tuple[Teacher, dict[str, LayerStats]]:
        qnet, ctx = self.qnet, self.qnet.context
        stats = {name: LayerStats() for name, _ in qnet.qconvs()}
        handles = []
        for name, conv in qnet.qconvs():
            def hook(_m: nn.Module, inputs: tuple[Tensor, ...], name: str = name) -> None:
                stats[name].update(inputs[0].detach(), self.config.ema_beta, self.generator)
            handles.append(conv.register_forward_pre_hook(hook))

            def out_hook(_m: nn.Module, _i: Any, out: Tensor, name: str = name) -> None:
                s = stats[name]
                s.out_min, s.out_max = min(s.out_min, float(out.min())), max(s.out_max,
                                                                               float(out.max()))
            handles.append(conv.register_forward_hook(out_hook))
        recorder = _BlockRecorder(qnet.model, self.blocks)
        outputs, features = [], []
        ctx.enabled = False
        try:
            with torch.no_grad():
                for chunk in patches.split(max(self.config.batch, 8)):
                    outputs.append(qnet(chunk))
                    features.append(recorder.take())
        finally:
            ctx.enabled = True
            recorder.close()
            for handle in handles:
                handle.remove()
        per_block = [torch.cat([f[i] for f in features]) for i in range(len(self.blocks))]
        teacher = Teacher(torch.cat(outputs), per_block, complexity(patches),
                          gradient_features(patches))
        return teacher, stats

    # -- stage 1 -----------------------------------------------------------------------------
    def initialize(self, teacher: Teacher, stats: dict[str, LayerStats]) -> None:
        qnet, method = self.qnet, self.settings.method
        adaptive = [stats[name] for name in qnet.adaptive_names]
        if self.settings.adaptive:
            # Granular-DQ's classes are 2 bits apart: a quarter of the patches each side keeps
            # the calibration average at the base, as AdaBM's 10th / 90th percentiles do
            tail = 0.25 if self.settings.image_step == 2 else 0.1
            qnet.image_to_bit.init_from(teacher.complexities, tail)
        if self.trains_layer_offsets:
            qnet.layer_to_bit.init_from(torch.tensor([s.sensitivity for s in adaptive]))
        offsets = qnet.hard_layer_offsets()
        for name, conv in qnet.qconvs():
            s = stats[name]
            if method == "minmax":
                lower, upper = s.global_min, s.global_max
            elif method == "ddtb" and conv.layer_index is not None:
                # DDTB's percentile init is for its low-bit body layers; the fixed 8-bit layers of
                # the fully quantized setting keep the full range (head/tail see image values).
                assert s.first_batch is not None
                lower = float(torch.quantile(s.first_batch.double(), 0.01))
                upper = float(torch.quantile(s.first_batch.double(), 0.99))
            elif method == "percentile" or (self.config.range_init == "percentile"
                                            and conv.layer_index is not None):
                pooled = torch.cat(s.pooled).double()
                lower = float(torch.quantile(pooled, STATIC_PERCENTILE))
                upper = float(torch.quantile(pooled, 1 - STATIC_PERCENTILE))
            elif self.config.range_init == "ema":
                assert s.ema_min is not None and s.ema_max is not None
                lower, upper = s.ema_min, s.ema_max
            else:  # global, and the fixed layers of a percentile init
                lower, upper = s.global_min, s.global_max
            conv.act_quant.set_bounds(lower, upper)
            if method in ("adabm", "cadyq", "granular") and self._bit_aware_clipping():
                bits = FIXED_BITS if conv.layer_index is None else (
                    self.settings.abits + offsets[conv.layer_index])
                self._bit_aware_clip(conv, s, bits)
        if method == "ddtb":
            self._attach_gates(stats)
        if self.settings.selector:
            self._init_selectors(teacher, stats)

    def _init_selectors(self, teacher: Teacher, stats: dict[str, LayerStats]) -> None:
        """Each selector standardized on, and started from, its calibration features."""
        for name, conv in self.qnet.qconvs():
            if conv.selector is not None:
                conv.selector.init_from(torch.cat([teacher.gradients,
                                                   torch.cat(stats[name].channel_stds)], dim=1))

    def _bit_aware_clipping(self) -> bool:
        """BaC ``on``, ``off``, or ``auto``: only at a base of 4 bits or fewer. Measured on EDSR x2
        (AdaBM, whole images): W4A4 (per-tensor weights) Set5 -0.462 dB with BaC, -0.939 without
        (the clipping is what makes 3-5 bits work); W8A6 Set14 -0.066 dB with, -0.028 without (at
        5-7 bits the MSE-best clip of a few smooth calibration photos cuts the tails of sharper
        content).
        """
        mode = self.config.bac
        return mode == "on" or (mode == "auto" and self.settings.abits <= BAC_AUTO_BITS)

    @property
    def trains_layer_offsets(self) -> bool:
        """AdaBM's per-layer offsets ``on``, ``off`` (every layer at ``base + d_img``, the bit
        margin then re-placing the image thresholds as Granular-DQ's budget does), or ``auto``:
        only above a base of 4 bits. Measured on EDSR x2 W4A4 (Set5, 2 threads, AMD EPYC): with
        layer offsets the budget lowers 3 layers to 3 bits (2 at ``d_img = -1``), and the result
        depends on the seed and on the float reduction order of the machine (-0.417 / -0.438 /
        -0.437 dB over seeds 0-2; -0.351 at 1 thread), almost all of it in the activation bounds
        of the 3-bit post-ReLU layers (``benchmarks/results/calibration_variance.md``)."""
        if not self.settings.layer_mapping:
            return False
        mode = self.config.layer_offsets
        return mode == "on" or (mode == "auto" and self.settings.abits > LAYER_OFFSETS_AUTO_BITS)

    @property
    def bit_margin(self) -> float:
        """``CalibrationConfig.bit_margin`` as given, or by default (None) 0.15, and 0 for CADyQ:
        its budget's pull leaves (almost) no layer-patch on the high candidate, so busier content
        cannot raise the FAB, and budgeted to the base it ran whole Set5 / Set14 images at FAB
        <= base + 0.04 (EDSR x2, IMDN x4; W8A6, W4A4; routed too), where 0.15 cost IMDN x4
        0.11-0.17 dB and EDSR x2 nothing (seed 0, ``benchmarks/results/dynamic_methods.md``).
        An explicit 0 keeps CADyQ's learned selectors (no budget), as it keeps AdaBM's layers
        and Granular-DQ's thresholds."""
        if self.config.bit_margin is not None:
            return self.config.bit_margin
        return BIT_MARGIN_DEFAULTS.get(self.settings.method, BIT_MARGIN_DEFAULT)

    @property
    def averaged_fraction(self) -> float:
        """``CalibrationConfig.average`` as given, or by default (None) 0.5 for AdaBM, Granular-DQ
        and CADyQ at a base of 4 bits or fewer, else 0. Measured on EDSR x2 W4A4 AdaBM, Set5,
        seeds 0-2 on each of 2 threads / 1 thread / 2 threads with AVX2 kernels (AMD EPYC,
        ``benchmarks/calibration_machines.py``): mean drop -0.273 / -0.285 / -0.295 dB, spread
        0.027 / 0.031 / 0.032 with it; -0.257 / -0.274 / -0.299 dB, spread 0.040 / 0.054 / 0.014
        without, all nine calibrations 0.047 dB apart against 0.073."""
        if self.config.average is not None:
            return self.config.average
        auto = (self.settings.method in AVERAGE_AUTO_METHODS
                and self.settings.abits <= AVERAGE_AUTO_BITS)
        return AVERAGE_AUTO_FRACTION if auto else 0.0

    @staticmethod
    def _bit_aware_clip(conv: QConv2d, stats: LayerStats, bits: float) -> None:
        """Scale both bounds by (1 - 0.01 i), keep the lowest MSE, move halfway to it."""
        sample = torch.cat(stats.pooled)
        errors = [conv.act_quant.quantization_error(sample, bits, 1 - 0.01 * i) for i in range(100)]
        best = 1 - 0.01 * min(range(100), key=errors.__getitem__)
        lower, upper = conv.act_quant.lower.item(), conv.act_quant.upper.item()
        conv.act_quant.set_bounds((lower + lower * best) / 2, (upper + upper * best) / 2)

    def _attach_gates(self, stats: dict[str, LayerStats]) -> None:
        names = self.qnet.adaptive_names
        fraction = GATED_FRACTION.get(self.loaded.info.arch.lower(), 0.3)
        count = max(1, round(fraction * len(names)))
        ranked = sorted(names, key=lambda n: stats[n].dynamic_intensity, reverse=True)[:count]
        for name in ranked:
            conv = self.qnet.model.get_submodule(name)
            assert isinstance(conv, QConv2d)
            gate = DynamicGate(conv.conv.in_channels)
            conv.gate = gate
        self._gated = ranked

    # -- stage 2 -----------------------------------------------------------------------------
    def _param_groups(self) -> dict[str, list[nn.Parameter]]:
        qnet = self.qnet
        groups: dict[str, list[nn.Parameter]] = {"weight": [], "act": [], "mapping": [], "gate": []}
        for _, conv in qnet.qconvs():
            groups["weight"].append(conv.weight_quant.clip)
            groups["act"] += [conv.act_quant.lower, conv.act_quant.upper]
            if conv.gate is not None:
                groups["gate"] += [p for n, p in conv.gate.named_parameters()]
        if self.settings.adaptive:
            # Granular-DQ (and AdaBM without layer offsets) keeps every layer offset at 0
            layer = [qnet.layer_to_bit.offsets] if self.trains_layer_offsets else []
            groups["mapping"] = [*layer, qnet.image_to_bit.lower, qnet.image_to_bit.upper]
        if self.settings.selector:
            groups["mapping"] = [p for _, conv in qnet.qconvs() if conv.selector is not None
                                 for p in conv.selector.parameters()]
        return groups

    def _loss(self, x: Tensor, index: Tensor, teacher: Teacher, recorder: _BlockRecorder,
              with_bits: bool) -> tuple[Tensor, float]:
        out = self.qnet(x)
        loss = F.l1_loss(out, teacher.outputs[index])
        feats = recorder.take()
        if self.config.skt_weight and feats:
            loss = loss + self.config.skt_weight * _skt_loss(
                feats, [f[index] for f in teacher.features])
        avg_bits = self.qnet.sample_bits().mean()
        if with_bits and self.settings.dynamic:
            loss = loss + self.config.bit_weight * F.relu(avg_bits - self.settings.abits)
        return loss, avg_bits.item()

    def validation_set(self, patches: Tensor, teacher: Teacher) -> Validation:
        """The held-out patches of ``run`` if there are any, else the first ``validation``
        calibration patches."""
        if self._validation is not None:
            return self._validation
        index = torch.arange(min(self.config.validation, patches.shape[0]))
        return Validation(patches[index], teacher.subset(index), held_out=False)

    def _validate(self, patches: Tensor, teacher: Teacher, recorder: _BlockRecorder) -> float:
        val = self.validation_set(patches, teacher)
        index = torch.arange(val.patches.shape[0])
        with torch.no_grad():
            loss, _ = self._loss(val.patches, index, val.teacher, recorder, with_bits=True)
        return float(loss)

    def _project(self) -> None:
        """Keep every learned quantity in its valid range after an optimizer step."""
        with torch.no_grad():
            for _, conv in self.qnet.qconvs():
                conv.weight_quant.bound_()
                aq = conv.act_quant
                if aq.symmetric:
                    aq.set_bounds(aq.lower.item(), aq.upper.item())  # back to [-a, a]
                aq.upper.copy_(torch.maximum(aq.upper, aq.lower + 1e-3))
            itb = self.qnet.image_to_bit
            itb.upper.copy_(torch.maximum(itb.upper, itb.lower + 1e-3))

    def _quant_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.qnet.state_dict().items()
                if not k.startswith("model.") or "_quant" in k or ".gate." in k
                or ".selector." in k}

    def _epoch(self, patches: Tensor, teacher: Teacher, recorder: _BlockRecorder,
               optimizers: list[torch.optim.Optimizer], steps: int, with_bits: bool,
               bar: Any = None, epoch: int = 0,
               average: ParameterAverage | None = None) -> None:
        """``steps`` optimizer steps on batches of a fresh permutation of the patches; with
        ``average``, its parameters end the epoch at their mean over the last ``average`` fraction
        of the steps (``CalibrationConfig.average``)."""
        order = torch.randperm(patches.shape[0], generator=self.generator)
        window = averaged_steps(steps, self.averaged_fraction) if average is not None else 0
        for step in range(steps):
            start = (step * self.config.batch) % patches.shape[0]
            index = order[start:start + self.config.batch]
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss, avg_bits = self._loss(patches[index], index, teacher, recorder, with_bits)
            if not torch.isfinite(loss):
                break
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            self._project()
            if average is not None and step >= steps - window:
                average.update()
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", bits=f"{avg_bits:.2f}",
                                refresh=False)
                bar.update(1)
        if average is not None and average.count:
            average.apply()
            self._project()

    def _training_bits(self, with_bits: bool) -> float | None:
        """CADyQ's selector layers run at the base in the epochs that train the clips and
        bounds (not the selectors), so that these fit the bits the budget then holds; None: as the
        selectors pick. IMDN x4 W4A4, seeds 0-2 (``--range-init percentile``, 2 threads): Set5
        / Set14 -2.034 / -1.232 dB (spread 0.071 / 0.008) against -2.214 / -1.351 (0.217 /
        0.164) with the selectors picking, both budgeted on held features (stop 24's budget);
        with the settled budget -2.008 / -1.223 (``benchmarks/results/
        dyn_imdn44_cadyq_3seeds.md``); AdaBM -1.980 / -1.200."""
        if self.settings.selector and not with_bits:
            return float(self.settings.abits)
        return None

    def train(self, patches: Tensor, teacher: Teacher) -> dict[str, Any]:
        cfg, qnet = self.config, self.qnet
        groups = self._param_groups()
        lrs = {"weight": cfg.lr_weight_clip, "act": cfg.lr_act, "mapping": cfg.lr_layer,
               "gate": cfg.lr_gate}
        optimizers = {}
        for key, params in groups.items():
            if not params:
                continue
            if key == "mapping" and self.settings.selector:
                optimizers[key] = torch.optim.Adam(params, lr=cfg.lr_selector)
            elif key == "mapping":
                layer = params[:-2]  # the layer offsets (none for Granular-DQ), then thresholds
                param_groups = [*([{"params": layer, "lr": cfg.lr_layer}] if layer else []),
                                {"params": params[-2:], "lr": cfg.lr_image}]
                optimizers[key] = torch.optim.Adam(param_groups)
            else:
                optimizers[key] = torch.optim.Adam(params, lr=lrs[key])
        schedulers = {k: torch.optim.lr_scheduler.StepLR(o, 1, cfg.gamma)
                      for k, o in optimizers.items()}
        recorder = _BlockRecorder(qnet.model, self.blocks)
        qnet.train()
        best = _Best(self._quant_state)
        best.offer(self._validate(patches, teacher, recorder), 0)
        steps_per_epoch = max(1, cfg.steps // cfg.epochs)
        bar = self.progress(cfg.epochs * steps_per_epoch, "calibrating") if self.progress else None
        cyclic_order = [k for k in ("weight", "act", "mapping") if k in optimizers]
        try:
            for epoch in range(1, cfg.epochs + 1):
                if cfg.schedule == "cyclic" and self.settings.dynamic:
                    active = [cyclic_order[(epoch - 1) % len(cyclic_order)]]
                else:
                    active = list(optimizers)
                with_bits = "mapping" in active
                for key, params in groups.items():  # frozen groups skip their gradient work
                    for param in params:
                        param.requires_grad_(key in active)
                # the quantizers' clips and bounds end each epoch at their average (the
                # mapping's thresholds and offsets make hard decisions, and are not averaged)
                averaged = [p for k in active if k in AVERAGED_GROUPS for p in groups[k]]
                with qnet.selectors_at(self._training_bits(with_bits)):
                    self._epoch(patches, teacher, recorder, [optimizers[k] for k in active],
                                steps_per_epoch, with_bits, bar, epoch,
                                ParameterAverage(averaged) if averaged and self.averaged_fraction
                                else None)
                for key in active:
                    schedulers[key].step()
                best.offer(self._validate(patches, teacher, recorder), epoch)
        finally:
            recorder.close()
            if bar is not None:
                bar.close()
        qnet.load_state_dict(best.state, strict=False)
        qnet.eval()
        return {"validation_loss": best.history, "best_epoch": best.index,
                "best_loss": best.loss}

    def fit_budget(self, patches: Tensor, teacher: Teacher) -> list[str]:
        """Lower layers by one bit, cheapest first, until ``mean(d_layer) <= -bit_margin``.

        The margin is room for deployment content busier than the calibration patches (the
        image offset is 0 on average over the calibration patches by its percentile init, but
        whole benchmark images never reach the flattest patches' -1, and the busiest reach +1).
        Each step lowers the layer whose lower bit-width raises the L1 distance to the FP outputs
        on the ``validation`` patches the least. Not the training loss: its SKT term sums block
        features, so a late layer's error shows in fewer terms and looks cheap (EDSR x2 W4A4,
        Set5: layers picked by L1 + SKT cost -0.058 dB, by L1 -0.019 dB). Returns the lowered
        layers, in order.
        """
        if not self.trains_layer_offsets or self.bit_margin <= 0:
            return []
        qnet, offsets = self.qnet, self.qnet.layer_to_bit.offsets
        val = self.validation_set(patches, teacher)
        lowered: list[str] = []

        def loss_with(layer: int, value: float) -> float:
            kept = float(offsets[layer])
            offsets[layer] = value
            loss = F.l1_loss(qnet(val.patches), val.teacher.outputs)
            offsets[layer] = kept
            return float(loss)

        # each step lowers the offsets' sum by one, down to the largest integer <= -margin * n
        limit = math.floor(-self.bit_margin * offsets.numel())
        steps = max(0, sum(qnet.layer_to_bit.hard()) - limit)
        bar = self.progress(steps, "bit budget") if self.progress and steps else None
        try:
            with torch.no_grad():
                for _ in range(steps):
                    hard = qnet.layer_to_bit.hard()
                    candidates = [k for k, o in enumerate(hard) if o > -1]
                    if not candidates:
                        break
                    costs = {k: loss_with(k, hard[k] - 1.0) for k in candidates}
                    layer = min(candidates, key=costs.__getitem__)
                    offsets[layer] = hard[layer] - 1.0
                    lowered.append(qnet.adaptive_names[layer])
                    if bar is not None:
                        bar.set_postfix(lowered=lowered[-1], refresh=False)
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return lowered

    def fit_selector_budget(self, patches: Tensor, teacher: Teacher) -> dict[str, Any] | None:
        """CADyQ's budget (``compiler.quant.selector_budget``) to ``base - bit_margin``: to the
        base by default; a margin of 0 given explicitly keeps the learned selectors (None)."""
        if self.config.bit_margin is not None and self.config.bit_margin <= 0:
            return None
        return fit_selector_budget(self.qnet, patches, teacher.outputs,
                                   self.settings.abits - self.bit_margin).to_json()

    def fit_threshold_budget(self, patches: Tensor, teacher: Teacher) -> dict[str, Any] | None:
        """Granular-DQ's budget (``compiler.quant.granular``) to ``base - bit_margin``; a margin
        of 0 keeps the learned thresholds (None)."""
        if self.bit_margin <= 0:
            return None
        budget = fit_threshold_budget(self.qnet, patches, teacher.outputs,
                                      self.settings.abits - self.bit_margin)
        return budget.to_json()

    def refine(self, patches: Tensor, teacher: Teacher, lowered: list[str]) -> dict[str, Any]:
        """Stage 4: re-fit the quantizers to the bits the budget left (``refine_steps``).

        The bounds and clips were trained at the bits before the budget lowered ``lowered``; at
        W4A4 a lowered layer runs at 2-3 bits. Re-clip those layers (BaC at their new d_img = 0
        bits, when BaC is on), then train the activation bounds and weight clips jointly with the
        mapping frozen, validating every ``refine_steps / 2`` steps and keeping the best state
        (the pre-refine one included)."""
        cfg, qnet = self.config, self.qnet
        if cfg.refine_steps <= 0 or not self.settings.adaptive:
            return {}
        offsets = qnet.layer_to_bit.hard()
        if self._bit_aware_clipping() and self._stats is not None:
            for name in dict.fromkeys(lowered):
                conv = qnet.model.get_submodule(name)
                assert isinstance(conv, QConv2d) and conv.layer_index is not None
                self._bit_aware_clip(conv, self._stats[name],
                                     self.settings.abits + offsets[conv.layer_index])
        groups = self._param_groups()
        params = groups["weight"] + groups["act"]
        for key, group in groups.items():
            for param in group:
                param.requires_grad_(key in ("weight", "act"))
        optimizer = torch.optim.Adam([{"params": groups["weight"], "lr": cfg.lr_weight_clip},
                                      {"params": groups["act"], "lr": cfg.lr_act}])
        recorder = _BlockRecorder(qnet.model, self.blocks)
        qnet.train()
        best = _Best(self._quant_state)
        best.offer(self._validate(patches, teacher, recorder), 0)
        rounds = 2
        per_round = max(1, cfg.refine_steps // rounds)
        try:
            for round_ in range(1, rounds + 1):
                self._epoch(patches, teacher, recorder, [optimizer], per_round, False)
                best.offer(self._validate(patches, teacher, recorder), round_)
        finally:
            recorder.close()
            for param in params:
                param.requires_grad_(True)
        qnet.load_state_dict(best.state, strict=False)
        qnet.eval()
        return {"refine_loss": best.history, "refine_best": best.index}

    def _mean_gate(self, conv: QConv2d, patches: Tensor) -> list[float]:
        """Mean (scale_l, scale_u) of a DDTB gate over the calibration patches."""
        scales: list[Tensor] = []
        assert conv.gate is not None
        gate = conv.gate
        handle = conv.register_forward_pre_hook(
            lambda _m, inputs: scales.append(gate(inputs[0])))
        try:
            for chunk in patches.split(FORWARD_CHUNK):
                self.qnet(chunk)
        finally:
            handle.remove()
        return [float(v) for v in torch.cat(scales).mean(dim=0)]

    # -- all stages ----------------------------------------------------------------------------
    def run(self, calib_dir: Path) -> CalibrationResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        started, cpu_started = time.perf_counter(), time.process_time()
        patches = sample_patches(calib_dir, cfg.patches + cfg.holdout, cfg.patch_size, cfg.seed,
                                 cfg.downscale)
        patches, held = patches[:cfg.patches], patches[cfg.patches:]
        teacher, stats = self.measure(patches)
        self._stats = stats
        if cfg.holdout:  # the held-out patches' teacher (their statistics stay out of the init)
            self._validation = Validation(held, self.measure(held)[0], held_out=True)
        self.initialize(teacher, stats)
        training: dict[str, Any] = {}
        if self.settings.method in ("adabm", "granular", "ddtb", "cadyq") and cfg.steps > 0:
            training = self.train(patches, teacher)
        training["budget_lowered"] = self.fit_budget(patches, teacher)
        if self.settings.selector:
            budget = self.fit_selector_budget(patches, teacher)
            training["selector_budget"] = budget
            training["selector_shift"] = budget["shift"] if budget else 0.0
        if self.settings.adaptive and not self.trains_layer_offsets:
            training["threshold_budget"] = self.fit_threshold_budget(patches, teacher)
        training.update(self.refine(patches, teacher, training["budget_lowered"]))
        for name, conv in self.qnet.qconvs():
            conv.output_range = (stats[name].out_min, stats[name].out_max)
            conv.input_range = (stats[name].global_min, stats[name].global_max)
            if conv.gate is not None:
                with torch.no_grad():
                    conv.gate_mean = tuple(self._mean_gate(conv, patches))
        with torch.no_grad():
            self.qnet(patches[: cfg.validation])
            fab = float(self.qnet.sample_bits().mean())
        if not all(torch.isfinite(p).all() for p in self.qnet.parameters()):
            raise CalibrationError("calibration diverged (non-finite parameters); "
                                   "try a lower learning rate or fewer --steps")
        info = {
            "config": asdict(cfg),
            "images": [p.name for p in list_images(calib_dir)],
            "seconds": round(time.perf_counter() - started, 2),
            "cpu_seconds": round(time.process_time() - cpu_started, 2),  # all threads
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen kernels used
            "calibration_fab": fab,
            "gated_layers": getattr(self, "_gated", []),
            "validation_patches": cfg.holdout or min(cfg.validation, cfg.patches),
            "validation_held_out": self._validation is not None,
            "averaged_fraction": self.averaged_fraction,
            "bit_margin": self.bit_margin,
            **training,
        }
        return CalibrationResult(self.qnet, record_of(self.qnet, self.loaded, info))


def calibrate(loaded: LoadedModel, settings: QuantSettings, config: CalibrationConfig,
              calib_dir: Path, progress: ProgressFactory | None = None) -> CalibrationResult:
    """Calibrate ``loaded`` (consumed: its convs are wrapped) and return the network + record.

    CADyQ: the record also holds its selectors' choices on ``CLUSTER_PATCHES`` calibration
    patches clustered into ``config.clusters`` engines (``compiler.quant.clusters``); the
    returned network is the selector network."""
    result = Calibrator(loaded, settings, config, progress).run(calib_dir)
    if not settings.selector:
        return result
    from compiler.quant.clusters import cluster_calibration

    started = time.perf_counter()
    record = cluster_calibration(result.record, result.qnet, calib_dir, asdict(config),
                                 config.clusters)
    record["calibration"] = {**record["calibration"],
                             "cluster_seconds": round(time.perf_counter() - started, 2)}
    return CalibrationResult(result.qnet, record)

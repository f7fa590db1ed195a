"""The engine plan: which engines a calibration record becomes on a target, before building any.

After AdaBM calibration there are exactly three per-layer bit vectors, one per image offset
``d_img`` in {-1, 0, +1}. Each becomes an engine; the mapping of a layer's simulated bits onto the
target's real kernel precisions is the *ladder*, chosen explicitly and recorded in the bundle:

- ``hardware`` (default): a layer runs on the cheapest precision of the target's ladder that holds
  its grid exactly (``int8`` holds integer grids up to 8 bits, ``fp8`` e4m3 up to 4 bits, ``fp4``
  e2m1 up to 2 bits); above 8 bits it runs at the target's top precision (FP16 on GPUs, FP32 on
  CPUs). Only rungs the lowering writes are used (``LOWERED``: fp8 / fp4 not yet; the plan printout
  says so for targets that list them). A k-bit grid on an INT8 kernel is a *candidate for widening*
  to the full 8-bit grid on the same learned bounds and clips: it costs no speed (same kernel) and
  the build keeps it only when measured not to lose accuracy (``compiler.bundle``), so on a CPU the
  three offsets usually collapse into one ``int8`` engine.
  The *trunk's ends* of a fully quantized record (``--float-layers auto``, the default) run at
  the top precision: the conv that reads the image (EDSR's ``head.0``, IMDN's ``fea_conv``) and
  the one that closes the global residual (``body.N``, ``LR_conv``; ``SRNet.trunk_ends``,
  stored in the record). The image conv's input, the mean-shifted image, has no exact per-tensor
  8-bit grid (and its 8-bit weights cost accuracy too), and the closing conv's 8-bit requantized
  output is added to the skip and rounded again at the upsampler's input. On bigbuckbunny frames
  (EDSR x2 W8A6 FQ, cpu-x86, per-patch dispatch, ``benchmarks/dispatch.py``, 100-step record)
  the all-INT8 engine is 0.170 dB below the FP32 engine at 2.64-2.67x its throughput, 0.102 dB
  with the image conv in FP32 (2.27x) and 0.049 dB with both ends as built below (2.17x; 0.047 dB
  with the closing conv wholly FP32); the upsampler or the RGB tail in FP32 instead cost more
  time for less (upsampler: 1.87x, 0.131 dB).
  ONNX Runtime computes them exactly, so engines still match their simulation bit for bit: the
  image conv on the integer pixels with 12-bit integer weights (``compiler.lower.image``), the
  closing conv on its 8-bit input levels with its int8 weights and a float output (an exact FP32
  conv, ``compiler.lower.ort._integer_conv``). TensorRT runs both as its FP16 convs (it runs the
  image conv in FP16 anyway: EDSR's head weights fall below FP16's normal range at int8 scale).
  ``--float-layers none`` gives the all-INT8 engine, ``--float-layers NAME,...`` any set of
  quantized layers (a float output on ONNX Runtime, FP16 on TensorRT).
- ``emulate``: each engine reproduces the simulated k-bit grids exactly inside INT8 (Clip +
  scale), for verifying the papers' accuracy on real integer kernels.

Whatever the mapping yields, the plan also carries the target's top-precision engine (the FP
graph: quality reference and upgrade rung), and identical engines are planned once, serving every
offset that maps to them. A hardware plan with float trunk ends on an ONNX Runtime target also
carries the all-INT8 engine (``int8-all``, the offset-0 grids with no float layer, serving no
offset): the cheapest engine rung of the bundle's rung ladder (``runtime.rungs``; the build
measures every rung's cost and loss, ``compiler.predictor``), below INT8 with top-precision ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from compiler.backends import builder
from compiler.layers import EngineLayer, engine_layers
from runtime.bundlepaths import engine_name_problem
from runtime.errors import ConfigError, unknown_name
from runtime.manifest import LADDERS, OFFSETS, TILES, LayerPlan, max_overlap
from targets.loader import Target

# The largest integer grid (bits) each reduced precision holds exactly: every integer level of a
# zero-anchored grid is representable (e4m3: all integers up to 16; e2m1: 0, 1, 2, 3, 4, 6).
EXACT_GRID_BITS = {"fp4": 2, "fp8": 4, "int8": 8}
FLOAT_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}
OFFSET_WORDS = {-1: "low", 0: "mid", 1: "high"}
# Reduced precisions the lowering writes today. A target may list fp8 / fp4 (Hopper, Ada, Thor),
# but a QuantizeLinear to fp8 rounds to the nearest fp8 value, not to the integer grid, so those
# need a lowering of their own (not written yet): until then their layers take the next rung.
LOWERED = ("int8",)
IMAGE_CHANNELS = 4  # a conv with at most this many input channels reads the image
FLOAT_CHOICES = ("auto", "none")  # or an explicit list of layer names
ALL_INT8 = "int8-all"  # the engine with every quantized layer on INT8 (a rung of the ladder)


@dataclass(frozen=True)
class PlannedEngine:
    """One engine to build: its per-layer lowering specs and what the manifest will say of it.

    ``specs`` is empty for the reference engine (the FP graph). ``exact`` holds the un-widened
    specs when ``specs`` widen some grid (hardware ladder), for the build's accuracy check.
    """

    name: str
    precision: str
    offsets: tuple[int, ...]
    reference: bool
    layers: tuple[LayerPlan, ...]
    specs: tuple[EngineLayer, ...]
    fab: float
    exact: tuple[EngineLayer, ...] | None = None

    def __post_init__(self) -> None:
        problem = engine_name_problem(self.name)
        if problem is not None:
            raise ConfigError(f"planned engine name {self.name!r}: expected {problem}")

    @property
    def widened(self) -> bool:
        return self.exact is not None


@dataclass(frozen=True)
class EnginePlan:
    target: Target
    ladder: str
    tile: int
    overlap: int
    engines: tuple[PlannedEngine, ...]
    record_summary: str
    widen: bool = True
    float_layers: tuple[str, ...] = ()
    collapse: str = ""  # how the image classes' bit configurations map onto kernels and engines


def kernel_precision(bits: float, ladder: Sequence[str], top: str) -> str:
    """The cheapest precision of ``ladder`` holding a ``bits``-bit integer grid exactly."""
    for precision in ladder:
        if bits <= EXACT_GRID_BITS.get(precision, 0):
            return precision
    return top


def lowered_ladder(ladder: Sequence[str]) -> tuple[str, ...]:
    """The rungs of a target's ladder that the lowering can write (float rungs always)."""
    return tuple(p for p in ladder if p in LOWERED or p in FLOAT_BITS)


def layer_plan(spec: EngineLayer, precision: str) -> LayerPlan:
    if precision in FLOAT_BITS:
        return LayerPlan(spec.name, precision, None, spec.w_bits)
    return LayerPlan(spec.name, precision, int(spec.act_bits), spec.w_bits)


def fab_of(layers: Sequence[LayerPlan], adaptive: set[str]) -> float:
    """Mean activation bits over the adaptive (body) layers; a float layer counts its width."""
    bits = [layer.act_bits if layer.act_bits is not None else FLOAT_BITS[layer.precision]
            for layer in layers if layer.name in adaptive]
    return float(sum(bits) / len(bits)) if bits else 0.0


def image_convs(record: Mapping[str, Any]) -> set[str]:
    """The record's convs that read the image (records before ``in_channels``: none known)."""
    return {layer["name"] for layer in record["layers"]
            if layer.get("in_channels", IMAGE_CHANNELS + 1) <= IMAGE_CHANNELS}


def trunk_ends(record: Mapping[str, Any]) -> set[str]:
    """The record's quantized trunk ends (records before ``trunk_end``: the image convs)."""
    layers = record["layers"]
    if any("trunk_end" in layer for layer in layers):
        return {layer["name"] for layer in layers if layer.get("trunk_end")}
    return image_convs(record)


def float_layers(record: Mapping[str, Any], ladder: str,
                 choice: str | Sequence[str] = "auto") -> set[str]:
    """The quantized layers the hardware ladder keeps at the top precision (module docstring):
    ``auto`` the trunk's ends, ``none``, or layer names (a sequence or ``"a,b"``)."""
    if isinstance(choice, str) and choice in FLOAT_CHOICES:
        return trunk_ends(record) if choice == "auto" and ladder == "hardware" else set()
    names = ([n.strip() for n in choice.split(",") if n.strip()] if isinstance(choice, str)
             else list(choice))
    known = [layer["name"] for layer in record["layers"]]
    for name in names:
        if name not in known:
            raise ConfigError(unknown_name("quantized layer", name, known)
                              + f" (or one of {', '.join(FLOAT_CHOICES)})")
    if ladder != "hardware":
        raise ConfigError("float layers apply to the hardware ladder; the emulate ladder "
                          "reproduces every simulated grid")
    return set(names)


def _offset_engine(record: Mapping[str, Any], offset: int, target: Target, ladder: str,
                   widen: bool, floating: set[str]
                   ) -> tuple[tuple[EngineLayer, ...], tuple[EngineLayer, ...] | None,
                              tuple[LayerPlan, ...]]:
    exact = engine_layers(record, offset)
    top = target.top_precision
    if ladder == "hardware":
        rungs = lowered_ladder(target.precision_ladder)
        kernels = tuple(top if s.name in floating else kernel_precision(
            max(s.act_bits, s.w_bits), rungs, top) for s in exact)
    else:
        kernels = tuple("int8" if s.quantizes_input else top for s in exact)
    specs = exact
    if ladder == "hardware" and widen:
        specs = tuple(_widened(s) if k == "int8" else s
                      for s, k in zip(exact, kernels, strict=True))
    # ONNX Runtime computes its float layers exactly (module docstring): the image conv on the
    # integer pixels, the others on their input's integer levels with a float output
    images, outputs = set(), set()
    if builder(target.backend).exact_float_layers:
        images = floating & image_convs(record)
        outputs = {s.name for s in exact if s.name in floating and s.quantizes_input} - images
    specs, exact = (tuple(replace(s, exact_image=True) if s.name in images else
                          replace(s, float_output=True) if s.name in outputs else s
                          for s in group) for group in (specs, exact))
    layers = tuple(LayerPlan(s.name, top, int(s.act_bits), s.w_bits) if s.name in outputs else
                   LayerPlan(s.name, k, None, None) if s.name in floating else layer_plan(s, k)
                   for s, k in zip(specs, kernels, strict=True))
    gone = floating - outputs - images
    kept = tuple(s for s in specs if s.name not in gone)
    exact_kept = tuple(s for s in exact if s.name not in gone)
    return kept, (exact_kept if kept != exact_kept else None), layers


def _widened(spec: EngineLayer) -> EngineLayer:
    """The 8-bit grid on the same bounds, stretched to contain 0.

    A low-bit grid whose learned lower bound sits just above 0 (after a ReLU) still rounds 0 to
    its lowest level (zero point 0); at 8 bits the same bounds give a zero point of -1 or -2,
    so every ReLU zero would become a small positive value: the widened grid includes 0.
    """
    bounds = (min(spec.bounds[0], 0.0), max(spec.bounds[1], 0.0))
    return replace(spec, act_bits=8.0, w_bits=8, bounds=bounds)


def _summary_precision(layers: Sequence[LayerPlan], floating: set[str]) -> str:
    """The engine's precision tag: its layers' one precision, else ``mixed`` (the float layers
    do not count: every hardware engine has them)."""
    kinds = {layer.precision for layer in layers if layer.name not in floating} or {
        layer.precision for layer in layers}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def plan_engines(record: Mapping[str, Any], target: Target, ladder: str = "hardware", *,
                 tile: int | None = None, overlap: int | None = None,
                 widen: bool = True, floats: str | Sequence[str] = "auto") -> EnginePlan:
    """The engines of ``record`` on ``target`` (see the module docstring).

    ``widen=False`` keeps the exact simulated grids on the hardware ladder's INT8 layers (what
    the build falls back to when widening measures worse); ``floats`` picks the layers kept at
    the top precision (:func:`float_layers`)."""
    if ladder not in LADDERS:
        raise ConfigError(unknown_name("ladder", ladder, LADDERS))
    tile = target.default_tile if tile is None else tile
    overlap = target.default_overlap if overlap is None else overlap
    if not (TILES[0] <= tile <= TILES[1] and 0 <= overlap <= max_overlap(tile)):
        raise ConfigError(f"tile {tile} / overlap {overlap}: the tile must be {TILES[0]}.."
                          f"{TILES[1]} LR pixels and the overlap in [0, tile/2)")
    adaptive = {layer["name"] for layer in record["layers"] if layer["kind"] == "adaptive"}
    groups: dict[tuple[EngineLayer, ...], list[int]] = {}
    built: dict[tuple[EngineLayer, ...], tuple[tuple[EngineLayer, ...] | None,
                                              tuple[LayerPlan, ...]]] = {}
    floating = float_layers(record, ladder, floats)
    if record["settings"]["method"] == "cadyq" and not record.get("clusters"):
        raise ConfigError("this cadyq record holds no clustered configurations, only its "
                          "selectors (which need each layer's input: no engine can route by "
                          "them); recalibrate with this adasr (`adasr calibrate --method cadyq` "
                          "clusters them)")
    configurations, kernels = set(), set()
    for offset in OFFSETS:
        specs, exact, layers = _offset_engine(record, offset, target, ladder, widen, floating)
        groups.setdefault(specs, []).append(offset)
        built[specs] = (exact, layers)
        configurations.add(tuple(s.act_bits for s in exact or specs))
        kernels.add(tuple(layer.precision for layer in layers))
    tags = [_summary_precision(built[specs][1], floating) for specs in groups]
    engines = []
    for (specs, offsets), tag in zip(groups.items(), tags, strict=True):
        exact, layers = built[specs]
        name = tag if tags.count(tag) == 1 else f"{tag}-{OFFSET_WORDS[offsets[0]]}"
        engines.append(PlannedEngine(name=name, precision=tag, offsets=tuple(offsets),
                                     reference=False, layers=layers, specs=specs,
                                     fab=fab_of(layers, adaptive), exact=exact))
    if ladder == "hardware" and floating and builder(target.backend).rung_ladder:
        specs, exact, layers = _offset_engine(record, 0, target, ladder, widen, set())
        if specs not in groups:
            engines.append(PlannedEngine(name=ALL_INT8, precision=_summary_precision(layers, set()),
                                         offsets=(), reference=False, layers=layers, specs=specs,
                                         fab=fab_of(layers, adaptive), exact=exact))
    top = target.top_precision
    reference_name = top if top not in {e.name for e in engines} else f"{top}-reference"
    ref_layers = tuple(LayerPlan(layer["name"], top, None, None) for layer in record["layers"])
    engines.append(PlannedEngine(name=reference_name, precision=top, offsets=(), reference=True,
                                 layers=ref_layers, specs=(), fab=fab_of(ref_layers, adaptive)))
    s = record["settings"]
    summary = (f"{s['method']} W{s['wbits']}A{s['abits']}{' FQ' if s.get('fq') else ''}, "
               f"thresholds {tuple(round(t, 3) for t in record['image_thresholds'])}")
    collapse = (f"image classes -1/0/+1: {len(configurations)} bit configuration(s) on "
                f"{len(kernels)} kernel configuration(s) ("
                + "; ".join(sorted(_kernel_words(k) for k in kernels))
                + f") -> {len(groups)} engine(s)")
    return builder(target.backend).complete(EnginePlan(  # the backend's own rungs added
        target, ladder, tile, overlap, tuple(engines), summary, widen,
        tuple(layer["name"] for layer in record["layers"] if layer["name"] in floating),
        collapse))


def _kernel_words(kernels: Sequence[str]) -> str:
    """``int8 x16, fp32 x2``: how many layers run on each kernel precision."""
    return ", ".join(f"{p} x{kernels.count(p)}" for p in sorted(set(kernels)))


def _skipped_rungs(ladder: Sequence[str]) -> list[str]:
    skipped = [p for p in ladder if p not in lowered_ladder(ladder)]
    return ([f"note: {', '.join(skipped)} listed by the target but not lowered yet; those layers "
             "run on the next rung"] if skipped else [])


def describe_plan(plan: EnginePlan, files: Mapping[str, Sequence[str]] | None = None) -> str:
    """A readable plan: one line per engine, then the per-layer precision table."""
    t = plan.target
    lines = [f"target {t.name} ({t.backend}; ladder {', '.join(t.precision_ladder)}), "
             f"{plan.ladder} ladder, tile {plan.tile} overlap {plan.overlap}",
             f"record: {plan.record_summary}", *_skipped_rungs(t.precision_ladder),
             *([f"kept at {t.top_precision}: {', '.join(plan.float_layers)}"]
               if plan.float_layers else []), *([plan.collapse] if plan.collapse else []), "",
             f"{'engine':<14} {'precision':<9} {'offsets':<9} {'FAB':>6}  files"]
    for e in plan.engines:
        served = ("reference" if e.reference
                  else ",".join(f"{d:+d}" for d in e.offsets) or "rung")
        listed = ", ".join(files.get(e.name, ())) if files else ""
        lines.append(f"{e.name:<14} {e.precision:<9} {served:<9} {e.fab:>6.2f}  {listed}"
                     + ("  (grids widened to 8 bits if measured no worse)" if e.widened else ""))
    lines += ["", "per-layer kernel precision / activation bits / weight bits:",
              f"{'layer':<24}" + "".join(f" {e.name:>14}" for e in plan.engines)]
    for i, layer in enumerate(plan.engines[0].layers):
        cells = []
        for e in plan.engines:
            lp = e.layers[i]
            cells.append(lp.precision if lp.act_bits is None
                         else f"{lp.precision} a{lp.act_bits}w{lp.w_bits}")
        lines.append(f"{layer.name:<24}" + "".join(f" {c:>14}" for c in cells))
    return "\n".join(lines)

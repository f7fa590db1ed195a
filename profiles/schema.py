"""The profile record (schema ``adasr.profile/1``): typed results, written and read as JSON.

A profile holds, for one bundle on one device:

* ``engines``: one :class:`EngineEntry` per (engine, tile, batch, threads) measured: the latency
  of one engine call on ``batch`` tiles (``latency_ms`` median / p10 / p90 over every timed run
  of every repeat), the medians of the repeats and their ``spread`` (max / min - 1: the noise),
  throughput in output megapixels per second, peak memory and the top per-layer times. The
  engine's quality fields (``psnr``, ``ssim``, ``fab``, ``bitops``) repeat in each of its entries,
  so every entry has ``name`` / ``latency_ms`` / ``psnr`` / ``fab``; the dispatcher's budget
  policy takes ``median / batch`` of the entry with the bundle's tile.
* ``quality``: one :class:`FrameQuality` per engine, measured through the dispatcher with policy
  ``fixed:NAME`` on the benchmark frames, and ``adaptive``: the same with policy ``threshold``.
  Their ``latency_ms`` is the time per *frame* (tiling, statistic, batching, stitching included)
  on the same frames, so engines and the adaptive dispatcher are comparable: the Pareto unit is
  ``latency_ms.mean``, the mean over the benchmark images of each image's median frame time.
* ``pareto``: where the adaptive point lies against the front of the static engines, and why.
* ``video`` (null when no clip was measured; absent in older profiles, read as null): every
  rung (``fixed:NAME``) and the bundle's default adaptive policy on the first frames of a real
  clip (:mod:`profiles.video`): Y-PSNR against the original frames, VMAF NEG, frames/s and tiles
  per rung (:class:`VideoQuality`).

Every reader goes through :func:`profile_from_json`, which names the first bad field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import BundleError
from runtime.fields import Field, root_field
from runtime.fileio import read_bundle_json
from runtime.policies import PROFILE_SCHEMA

__all__ = [
    "PARETO_UNIT",
    "SCHEMA",
    "EngineEntry",
    "FrameQuality",
    "ImageResult",
    "LayerTime",
    "Latency",
    "ParetoVerdict",
    "Profile",
    "Settings",
    "VideoPolicy",
    "VideoQuality",
    "profile_from_json",
    "read_profile",
]

SCHEMA = PROFILE_SCHEMA
MAX_COUNT = 1 << 31  # tiles, batches, threads, runs ... in a profile
PARETO_UNIT = ("ms per frame: mean over the benchmark images of the median time of one "
               "Dispatcher.upscale (policy fixed:NAME for an engine, threshold for adaptive)")
UNITS = {
    "engines.latency_ms": "ms per engine call on `batch` tiles of `tile` x `tile` LR pixels",
    "quality.latency_ms": "ms per frame through the dispatcher (mean: " + PARETO_UNIT + ")",
    "throughput_mpix_s": "output (SR) megapixels per second",
    "peak_rss_mb": "peak resident host memory in MiB while measuring (see settings.memory)",
    "bitops": "GBitOPs per frame (engines.bitops: per call): MACs x w_bits/32 x a_bits/32",
    "fab": "feature average bit-width (float layers count 32)",
    "psnr": "dB, Y channel, `scale` border pixels cropped",
    "video.policies.psnr": "dB, Y channel, `scale` border pixels cropped, mean over the frames",
    "video.policies.vmaf_neg": "VMAF with the NEG model (video.vmaf_model), 0..100, mean over "
                               "the frames, against the original frames",
    "video.policies.ms_per_frame": "ms per Dispatcher.upscale of one clip frame (1000 / fps)",
}


@dataclass(frozen=True)
class Latency:
    """Summary of timed samples in ms; ``mean`` is their mean (frames: see the module doc)."""

    median: float
    p10: float
    p90: float
    mean: float
    runs: int


@dataclass(frozen=True)
class LayerTime:
    """One layer (or kernel) of an engine: mean ms per engine call and its share of the total."""

    name: str  # module name (``body.0.body.2``) when known, else the kernel's node name
    op: str  # kernel type (``QLinearConv``, ``Conv``, TensorRT layer type ...)
    ms: float
    share: float


@dataclass(frozen=True)
class EngineEntry:
    """Latency of one engine at one (tile, batch, threads), with the engine's quality fields."""

    name: str
    tile: int
    batch: int
    threads: int
    timer: str  # "wall-clock" | "cuda-event"
    latency_ms: Latency
    repeat_medians_ms: tuple[float, ...]
    spread: float  # max / min - 1 of the repeat medians (0 with one repeat)
    throughput_mpix_s: float
    peak_rss_mb: float | None
    psnr: float | None
    ssim: float | None
    fab: float
    bitops: float | None  # GBitOPs per call (batch tiles)
    layers: tuple[LayerTime, ...] = ()


@dataclass(frozen=True)
class ImageResult:
    name: str
    psnr: float
    ssim: float
    frame_ms: float  # median over the repeats


@dataclass(frozen=True)
class FrameQuality:
    """An engine (policy ``fixed:NAME``) or the adaptive dispatcher on the benchmark frames."""

    name: str  # engine name, or "adaptive"
    policy: str
    mode: str
    tile: int
    batch: int
    threads: int
    latency_ms: Latency  # per frame; mean = the Pareto unit
    throughput_mpix_s: float
    ms_per_mpix: float  # total time / total output megapixels
    overhead_ms: float | None  # per frame, dispatcher stages other than inference
    infer_ms: float | None  # per frame, time inside the engines' infer calls
    peak_rss_mb: float | None
    psnr: float
    ssim: float
    fab: float  # tile-area-weighted, mean over frames
    bitops: float | None  # GBitOPs per frame, mean over frames
    histogram: dict[str, int] = field(default_factory=dict)  # tiles per engine, all frames
    images: tuple[ImageResult, ...] = ()


@dataclass(frozen=True)
class ParetoVerdict:
    """The adaptive point against the PSNR-vs-latency front of the static engines."""

    unit: str
    front: tuple[str, ...]  # static engines on the front, fastest first
    adaptive_on_front: bool  # no static engine is at least as fast and at least as good
    dominated_by: tuple[str, ...]
    margin_db: float | None  # adaptive PSNR - best static PSNR at <= its latency (None: none)
    explanation: str


@dataclass(frozen=True)
class Settings:
    """What was measured and how (the resolved options of the run)."""

    tiles: tuple[int, ...]
    batches: tuple[int, ...]
    threads: tuple[int, ...]
    runs: int
    warmup: int
    repeat: int
    layer_runs: int
    frame_batch: int
    frame_repeats: int
    datasets: tuple[str, ...]
    images: int
    memory: str  # how peak memory was measured


@dataclass(frozen=True)
class VideoPolicy:
    """One policy on the clip: a rung or engine (``fixed:NAME``) or the adaptive default."""

    name: str  # rung / engine name, or "adaptive"
    policy: str  # fixed:NAME, or the bundle's default policy (quality / threshold)
    psnr: float  # dB, Y, ``scale`` border cropped, mean over the frames
    vmaf_neg: float  # 0..100, mean over the frames
    fps: float  # frames per second of the timed Dispatcher.upscale calls
    ms_per_frame: float
    histogram: dict[str, int] = field(default_factory=dict)  # tiles per rung, all frames


@dataclass(frozen=True)
class VideoQuality:
    """Every rung and the bundle's default adaptive policy on the first frames of a clip (HR:
    those frames; LR: their MATLAB-bicubic x1/scale)."""

    clip: str
    frames: int
    width: int  # of the HR frames (the outputs)
    height: int
    vmaf_model: str
    hysteresis: float  # of the adaptive policy
    batch: int
    threads: int
    top: str  # the quality reference: the ladder's top rung, else the reference engine
    policies: tuple[VideoPolicy, ...]  # fixed rungs cheapest first, then "adaptive"

    def policy(self, name: str) -> VideoPolicy | None:
        return next((p for p in self.policies if p.name == name), None)


@dataclass(frozen=True)
class Profile:
    target: str
    model: str
    backend: str
    bundle: str
    created: str  # ISO 8601, UTC
    device: dict[str, Any]
    versions: dict[str, str | None]
    settings: Settings
    engines: tuple[EngineEntry, ...]
    quality: tuple[FrameQuality, ...]
    adaptive: FrameQuality
    pareto: ParetoVerdict
    notes: tuple[str, ...] = ()
    video: VideoQuality | None = None
    schema: str = SCHEMA

    @property
    def max_spread(self) -> float:
        return max((e.spread for e in self.engines), default=0.0)

    def quality_of(self, name: str) -> FrameQuality | None:
        return next((q for q in self.quality if q.name == name), None)

    def to_json(self) -> dict[str, Any]:
        data = {"schema": self.schema, **asdict(self)}  # schema first, for a person reading
        data["units"] = dict(UNITS)
        data["repeatability"] = {"repeat": self.settings.repeat, "max_spread": self.max_spread}
        return data


# ---------------------------------------------------------------- reading


def _latency(f: Field) -> Latency:
    return Latency(f["median"].number(0), f["p10"].number(0), f["p90"].number(0),
                   f["mean"].number(0), f["runs"].integer(0, MAX_COUNT))


def _optional(f: Field | None) -> float | None:
    return None if f is None else f.number(infinite=True)


def _count(f: Field) -> int:
    return f.integer(0, MAX_COUNT)


def _engine(f: Field) -> EngineEntry:
    return EngineEntry(
        name=f["name"].text(256), tile=_count(f["tile"]), batch=_count(f["batch"]),
        threads=_count(f["threads"]), timer=f["timer"].text(256),
        latency_ms=_latency(f["latency_ms"]),
        repeat_medians_ms=tuple(v.number(0) for v in f["repeat_medians_ms"].items()),
        spread=f["spread"].number(0), throughput_mpix_s=f["throughput_mpix_s"].number(0),
        peak_rss_mb=_optional(f.get("peak_rss_mb")), psnr=_optional(f.get("psnr")),
        ssim=_optional(f.get("ssim")), fab=f["fab"].number(0, 32),
        bitops=_optional(f.get("bitops")),
        layers=tuple(LayerTime(x["name"].text(), x["op"].text(256), x["ms"].number(0),
                               x["share"].number(0, 1)) for x in f["layers"].items()))


def _quality(f: Field) -> FrameQuality:
    return FrameQuality(
        name=f["name"].text(256), policy=f["policy"].text(256), mode=f["mode"].text(256),
        tile=_count(f["tile"]), batch=_count(f["batch"]), threads=_count(f["threads"]),
        latency_ms=_latency(f["latency_ms"]),
        throughput_mpix_s=f["throughput_mpix_s"].number(0),
        ms_per_mpix=f["ms_per_mpix"].number(0), overhead_ms=_optional(f.get("overhead_ms")),
        infer_ms=_optional(f.get("infer_ms")), peak_rss_mb=_optional(f.get("peak_rss_mb")),
        psnr=f["psnr"].number(infinite=True), ssim=f["ssim"].number(), fab=f["fab"].number(0, 32),
        bitops=_optional(f.get("bitops")),
        histogram={key: _count(v) for key, v in f["histogram"].members()},
        images=tuple(ImageResult(x["name"].text(), x["psnr"].number(infinite=True),
                                 x["ssim"].number(),
                                 x["frame_ms"].number(0)) for x in f["images"].items()))


def _video(f: Field) -> VideoQuality:
    return VideoQuality(
        clip=f["clip"].text(), frames=_count(f["frames"]), width=_count(f["width"]),
        height=_count(f["height"]), vmaf_model=f["vmaf_model"].text(256),
        hysteresis=f["hysteresis"].number(0, 1), batch=_count(f["batch"]),
        threads=_count(f["threads"]), top=f["top"].text(256),
        policies=tuple(VideoPolicy(
            name=p["name"].text(256), policy=p["policy"].text(256),
            psnr=p["psnr"].number(infinite=True), vmaf_neg=p["vmaf_neg"].number(0, 100),
            fps=p["fps"].number(0), ms_per_frame=p["ms_per_frame"].number(0),
            histogram={key: _count(v) for key, v in p["histogram"].members()})
            for p in f["policies"].items(1)))


def _ints(f: Field) -> tuple[int, ...]:
    return tuple(_count(v) for v in f.items())


def _texts(f: Field) -> tuple[str, ...]:
    return tuple(v.text() for v in f.items())


def profile_from_json(data: object) -> Profile:
    """Parse profile data (any JSON value); one-line :class:`BundleError`s name the schema or
    the first bad field (``profile field engines[0].latency_ms.median: expected ...``)."""
    schema = data.get("schema") if isinstance(data, Mapping) else None
    if schema != SCHEMA:
        raise BundleError(f"profile schema {schema!r} is not supported; this adasr reads "
                          f"{SCHEMA!r}: run `adasr profile BUNDLE` again")
    f = root_field(data, "profile", BundleError)
    s, p = f["settings"], f["pareto"]
    settings = Settings(
        tiles=_ints(s["tiles"]), batches=_ints(s["batches"]), threads=_ints(s["threads"]),
        runs=_count(s["runs"]), warmup=_count(s["warmup"]), repeat=_count(s["repeat"]),
        layer_runs=_count(s["layer_runs"]), frame_batch=_count(s["frame_batch"]),
        frame_repeats=_count(s["frame_repeats"]), datasets=_texts(s["datasets"]),
        images=_count(s["images"]), memory=s["memory"].text())
    pareto = ParetoVerdict(
        unit=p["unit"].text(), front=_texts(p["front"]),
        adaptive_on_front=p["adaptive_on_front"].boolean(),
        dominated_by=_texts(p["dominated_by"]), margin_db=_optional(p.get("margin_db")),
        explanation=p["explanation"].text(1 << 16, lines=True))
    notes, video = f.get("notes"), f.get("video")
    return Profile(
        target=f["target"].text(256), model=f["model"].text(256), backend=f["backend"].text(256),
        bundle=f["bundle"].text(), created=f["created"].text(256),
        device=dict(f["device"].obj()), versions=_versions(f["versions"]), settings=settings,
        engines=tuple(_engine(e) for e in f["engines"].items()),
        quality=tuple(_quality(q) for q in f["quality"].items()),
        adaptive=_quality(f["adaptive"]), pareto=pareto,
        notes=() if notes is None else tuple(n.text(1 << 16, lines=True) for n in notes.items()),
        video=None if video is None else _video(video))


def _versions(f: Field) -> dict[str, str | None]:
    return {key: None if v.value is None else v.text(256) for key, v in f.members()}


def read_profile(path: Path) -> Profile:
    """The profile stored at ``path`` (a ``.json`` written by ``adasr profile``)."""
    data = read_bundle_json(Path(path), "profile ",
                            "does not exist: write one with `adasr profile BUNDLE --json FILE`")
    return profile_from_json(data)


"""Profile a bundle: latency per engine / tile / batch / threads, quality per engine, Pareto.

:func:`profile_bundle` runs, in order:

1. **latency** -- for every engine (cheapest first), tile, batch and thread count: a fresh engine
   on random ``batch x 3 x tile x tile`` input, ``repeat`` times (``warmup`` untimed calls, then
   ``runs`` timed ones); the entry's ``latency_ms`` summarises all timed calls, the repeats'
   medians and their spread report the noise. Wall-clock time on CPU, CUDA events on TensorRT.
   Then the per-layer times of the same configuration (:mod:`profiles.layers`,
   :mod:`profiles.tensorrt`). Configurations an engine cannot run (a static tile of another
   size; a static batch of another size on ONNX Runtime) are skipped with a note.
2. **quality** -- every engine through ``Dispatcher(policy="fixed:NAME")`` and the adaptive
   dispatcher (``policy="threshold"``) on the same benchmark frames (:mod:`profiles.frames`).
3. **Pareto** -- the adaptive point against the static front (:mod:`profiles.pareto`).
4. **video** (with ``video``) -- every rung and the bundle's default adaptive policy on the first
   ``video_frames`` frames of a clip: Y-PSNR, VMAF NEG, frames/s, tiles per rung
   (:mod:`profiles.video`). The clip is decoded and the VMAF tool found before step 1, so bad
   input fails before any measuring.

:func:`save_profile` writes the result to ``<results>/<target>/<model>.json`` when a results folder
is given and into the bundle as ``profile.json``, then points ``manifest.profile`` at it
(atomic writes; the manifest last).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from profiles.bitops import tile_gbitops
from profiles.device import device_info, library_versions
from profiles.frames import measure_frames
from profiles.pareto import Evidence, Point, assess_adaptive
from profiles.schema import EngineEntry, FrameQuality, LayerTime, Profile, Settings
from profiles.timing import PeakMemory, Timer, latency_stats, spread, time_runs, wall_clock
from profiles.video import check_frames, load_clip, measure_video
from runtime.backends import runtime_backend
from runtime.benchmark import BenchmarkImage, load_benchmark
from runtime.bundle import Bundle, open_bundle
from runtime.engines.base import Engine
from runtime.errors import BundleError, ConfigError, OutputError
from runtime.fileio import atomic_write_json
from runtime.manifest import EngineSpec, read_manifest, write_manifest
from runtime.policies import engine_order

if TYPE_CHECKING:
    from runtime.engines.tensorrt import TensorRTEngine  # imported when a bundle needs it

__all__ = [
    "DEFAULT_BENCHMARKS", "DEFAULT_VIDEO", "MIN_RUNS", "PROFILE_NAME", "RESULTS_DIR",
    "ProfileOptions", "default_datasets", "default_video", "profile_bundle", "results_path",
    "save_profile",
]

MIN_RUNS = 20  # timed runs per repeat unless ``quick``
PROFILE_NAME = "profile.json"  # inside the bundle, referenced by manifest.profile
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_BENCHMARKS = ("Set5", "Set14")
DEFAULT_VIDEO = "video/carphone_pristine.mp4"  # under the shared data: QCIF, seconds a rung
_REPO = Path(__file__).resolve().parent.parent
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ProfileOptions:
    """What to measure. Empty ``tiles`` / ``threads`` / ``datasets`` mean the bundle's tile, the
    bundle's threads and :func:`default_datasets`."""

    tiles: tuple[int, ...] = ()
    batches: tuple[int, ...] = (1, 8)
    threads: tuple[int, ...] = ()
    runs: int = MIN_RUNS
    warmup: int = 3
    repeat: int = 3
    layer_runs: int = 5  # 0: no per-layer profile
    top_layers: int = 8
    datasets: tuple[Path, ...] = ()
    max_images: int | None = None  # per dataset
    frame_batch: int = 8
    frame_repeats: int = 3
    quick: bool = False  # allow runs < MIN_RUNS (tests, smoke runs)
    seed: int = 0
    # backends to time every engine with as well (entries NAME@BACKEND, right after the
    # bundle's own; engines a backend cannot run are noted): side by side in one run
    backends: tuple[str, ...] = ()
    video: Path | None = None  # a clip for the video quality (None: none measured)
    video_frames: int = 8  # its first frames

    def __post_init__(self) -> None:
        if self.runs < (1 if self.quick else MIN_RUNS):
            raise ConfigError(f"runs must be >= {MIN_RUNS} (percentiles need them), got "
                              f"{self.runs}; use --quick for a rough smoke measurement")
        for name, values, low in (("tiles", self.tiles, 1), ("batch sizes", self.batches, 1),
                                  ("threads", self.threads, 0)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise ConfigError(f"{name} must be integers >= {low}, got {list(values)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} must not repeat, got {list(values)}")
        if not self.batches:
            raise ConfigError("give at least one batch size")
        for name in self.backends:
            runtime_backend(name)  # a one-line error naming the registered backends
        counts = {"warmup": (self.warmup, 0), "repeat": (self.repeat, 1),
                  "layer_runs": (self.layer_runs, 0), "top_layers": (self.top_layers, 1),
                  "frame_batch": (self.frame_batch, 1), "frame_repeats": (self.frame_repeats, 1)}
        for name, (value, low) in counts.items():
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images must be >= 1, got {self.max_images}")
        check_frames(self.video_frames)


def _shared_roots() -> list[Path]:
    """``$ADASR_SHARED_DATA`` (when set), then ``../shared/data`` next to the repository."""
    roots = [Path(os.environ["ADASR_SHARED_DATA"])] if os.environ.get("ADASR_SHARED_DATA") else []
    return [*roots, _REPO.parent / "shared" / "data"]


def default_datasets() -> tuple[Path, ...]:
    """Set5 and Set14 from the shared data (``$ADASR_SHARED_DATA`` or ``../shared/data``)."""
    for root in _shared_roots():
        found = tuple(root / "benchmarks" / name for name in DEFAULT_BENCHMARKS
                      if (root / "benchmarks" / name / "HR").is_dir())
        if found:
            return found
    return ()


def default_video() -> Path | None:
    """carphone_pristine.mp4 from the shared data (as :func:`default_datasets`), or None."""
    return next((root / DEFAULT_VIDEO for root in _shared_roots()
                 if (root / DEFAULT_VIDEO).is_file()), None)


def _images(datasets: Sequence[Path], scale: int, limit: int | None) -> list[BenchmarkImage]:
    images = []
    for root in datasets:
        for image in load_benchmark(root, scale)[:limit]:
            images.append(replace(image, name=f"{root.name}/{image.name}"))
    return images


def _skip_reason(spec: EngineSpec, tile: int, batch: int) -> str | None:
    """Why an engine cannot run ``batch`` tiles of ``tile``, or None. A TensorRT engine of a
    static batch runs fewer tiles padded (and more in chunks), so only its tile must match."""
    n, _, h, _ = spec.input_shape
    if h > 0 and h != tile:
        return f"engine {spec.name!r} is built for {h} x {h} tiles: tile {tile} not measured"
    if n > 0 and n != batch and not runtime_backend(spec.backend).pads_batch:
        return f"engine {spec.name!r} is built for batch {n}: batch {batch} not measured"
    return None


def _engine_of(entry: str) -> str:
    """The bundle engine an entry measured (``int8@openvino``: ``int8`` with OpenVINO)."""
    return entry.partition("@")[0]


def _tensorrt_engine(engine: Engine) -> TensorRTEngine | None:
    """``engine`` when it is a TensorRT engine (that module imports no GPU library itself)."""
    from runtime.engines.tensorrt import TensorRTEngine

    return engine if isinstance(engine, TensorRTEngine) else None


def _measure_entry(bundle: Bundle, spec: EngineSpec, tile: int, batch: int, threads: int,
                   options: ProfileOptions, memory: PeakMemory,
                   backend: str | None = None) -> EngineEntry:
    """Latency (all repeats), peak memory and per-layer times of one configuration
    (``backend``: opened with that backend, entry ``NAME@BACKEND``, no per-layer times)."""
    rng = np.random.default_rng(options.seed)
    x = rng.random((batch, 3, tile, tile), dtype=np.float32)
    engine = bundle.engine(spec.name, threads=threads, backend=backend)
    layers: tuple[LayerTime, ...] = ()
    memory.reset()
    with engine:
        gpu = _tensorrt_engine(engine)
        timer: Timer = wall_clock
        timer_name = "wall-clock"
        if gpu is not None:
            from profiles.tensorrt import cuda_event_timer

            timer, timer_name = cuda_event_timer(gpu), "cuda-event"
        samples, medians = [], []
        for _ in range(options.repeat):
            runs = time_runs(lambda: engine.infer(x), warmup=options.warmup, runs=options.runs,
                             timer=timer)
            samples += runs
            medians.append(float(np.median(runs)))
        peak = memory.peak_mb()
        if gpu is not None and options.layer_runs:
            from profiles.tensorrt import tensorrt_layer_times

            layers = tensorrt_layer_times(gpu, bundle.path(spec.onnx, spec.name), x,
                                          runs=options.layer_runs, top=options.top_layers)
    if gpu is None and options.layer_runs and backend is None:
        from profiles.layers import onnxruntime_layer_times

        layers = onnxruntime_layer_times(
            spec.name, bundle.path(spec.onnx, spec.name), x, scale=bundle.scale,
            tile=tile if spec.input_shape[2] > 0 else None, threads=threads,
            runs=options.layer_runs, top=options.top_layers)
    stats = latency_stats(samples)
    out_mpix = batch * (tile * bundle.scale) ** 2 / 1e6
    return EngineEntry(
        name=spec.name if backend is None else f"{spec.name}@{backend}", tile=tile,
        batch=batch, threads=threads, timer=timer_name,
        latency_ms=stats, repeat_medians_ms=tuple(medians), spread=spread(medians),
        throughput_mpix_s=out_mpix / (stats.median / 1000.0) if stats.median > 0 else 0.0,
        peak_rss_mb=peak, psnr=None, ssim=None, fab=spec.fab, bitops=None, layers=layers)


def _evidence(quality: Sequence[FrameQuality], adaptive: FrameQuality, frames: int) -> Evidence:
    """What explains the adaptive point: each engine's ms per tile alone (its fixed-policy
    engine time over its tiles) and what the adaptive tile mix would cost at those rates."""
    tile_ms: dict[str, float] = {}
    for q in quality:
        tiles = sum(q.histogram.values())
        if q.infer_ms is not None and tiles:
            tile_ms[q.name] = q.infer_ms * frames / tiles
    expected = None
    if set(adaptive.histogram) <= set(tile_ms):
        expected = sum(count * tile_ms[name] for name, count in adaptive.histogram.items()) / frames
    return Evidence(histogram=adaptive.histogram, overhead_ms=adaptive.overhead_ms,
                    infer_ms=adaptive.infer_ms, expected_infer_ms=expected, tile_ms=tile_ms)


def profile_bundle(root: Path, options: ProfileOptions | None = None, *,
                   progress: Progress | None = None) -> Profile:
    """Measure the bundle at ``root`` (see the module docstring)."""
    options = options or ProfileOptions()
    say = progress or (lambda _message: None)
    bundle = open_bundle(Path(root))
    manifest = bundle.manifest
    datasets = options.datasets or default_datasets()
    if not datasets:
        raise ConfigError(f"no benchmark folder to measure quality on: none given and no "
                          f"{'/'.join(DEFAULT_BENCHMARKS)} under $ADASR_SHARED_DATA or "
                          f"{_REPO.parent / 'shared' / 'data'}: pass --dataset DIR (HR/ inside)")
    images = _images(datasets, bundle.scale, options.max_images)
    clip = None
    if options.video is not None:
        from runtime.vmaf import ffmpeg_path

        ffmpeg_path()  # the VMAF tool, before measuring
        say(f"decoding {options.video_frames} frames of {options.video}")
        clip = load_clip(options.video, options.video_frames, bundle.scale)
    backend = runtime_backend(manifest.backend)
    tiles = options.tiles or (manifest.tile,)
    threads = (options.threads or (manifest.threads,)) if backend.threads else (0,)
    memory = PeakMemory()
    notes: list[str] = []
    if not backend.threads:
        notes.append(f"threads do not apply to {backend.label} engines: recorded as 0")
    order = engine_order(manifest)
    static_batches = {spec.input_shape[0] for spec in manifest.engines} - {-1, 0}
    frame_batch = min(static_batches) if static_batches else options.frame_batch

    gbitops: dict[tuple[str, int], float | None] = {}
    for name in order:
        for tile in {*tiles, manifest.tile}:
            gbitops[name, tile] = tile_gbitops(manifest.engine(name), bundle.root, tile)
    if any(v is None for v in gbitops.values()):
        notes.append("BitOPs unknown for some engines (the onnx package is missing or a conv "
                     "shape could not be inferred)")

    entries: list[EngineEntry] = []
    others = [name for name in options.backends if name != manifest.backend]
    for name in order:
        spec = manifest.engine(name)
        for tile in tiles:
            for batch in options.batches:
                for count in threads:
                    reason = _skip_reason(spec, tile, batch)
                    if reason is not None:
                        notes.append(reason)
                        continue
                    for other in (None, *others):
                        why = None if other is None else runtime_backend(other).runs(spec)
                        if why is not None:
                            if f"{other}: {why}" not in notes:
                                notes.append(f"{other}: {why}")
                            continue
                        say(f"latency {name}{'' if other is None else '@' + other} tile {tile} "
                            f"batch {batch} threads {count}")
                        entries.append(_measure_entry(bundle, spec, tile, batch, count,
                                                      options, memory, other))
    if not entries:
        raise ConfigError(f"nothing could be measured: {'; '.join(notes)}")

    from runtime.dispatch import Dispatcher

    per_tile = {name: gbitops[name, manifest.tile] for name in order}
    frame_threads = manifest.threads if backend.threads else 0

    def frames(name: str, policy: str, names: Sequence[str],
               other: str | None = None) -> FrameQuality:
        say(f"quality {name} ({policy}) on {len(images)} images")
        engines = {n: bundle.engine(n, backend=other) for n in names}
        dispatcher = Dispatcher(manifest, engines, policy=policy, batch=frame_batch)
        return measure_frames(name, policy, dispatcher, manifest, images,
                              repeats=options.frame_repeats, threads=frame_threads,
                              tile_bitops=per_tile, memory=memory)

    quality = tuple(frames(name, f"fixed:{name}", [name]) for name in order) + tuple(
        frames(f"{name}@{other}", f"fixed:{name}", [name], other) for other in others
        for name in order if runtime_backend(other).runs(manifest.engine(name)) is None)
    adaptive = frames("adaptive", "threshold", order)
    by_name: Mapping[str, FrameQuality] = {q.name: q for q in quality}
    entries = [replace(e, psnr=by_name[e.name].psnr, ssim=by_name[e.name].ssim,
                       bitops=None if gbitops[_engine_of(e.name), e.tile] is None
                       else (gbitops[_engine_of(e.name), e.tile] or 0.0) * e.batch)
               for e in entries]
    video = None
    if clip is not None:
        if len(clip.hr) < clip.requested:
            notes.append(f"video {clip.path} has {len(clip.hr)} frames, not the "
                         f"{clip.requested} asked for: measured on {len(clip.hr)}")
        video = measure_video(bundle, clip, batch=frame_batch, threads=frame_threads,
                              progress=say)
    pareto = assess_adaptive(
        [Point(q.name, q.latency_ms.mean, q.psnr) for q in quality],
        Point("adaptive", adaptive.latency_ms.mean, adaptive.psnr),
        _evidence(quality, adaptive, len(images)))
    settings = Settings(
        tiles=tuple(tiles), batches=options.batches, threads=tuple(threads), runs=options.runs,
        warmup=options.warmup, repeat=options.repeat, layer_runs=options.layer_runs,
        frame_batch=frame_batch, frame_repeats=options.frame_repeats,
        datasets=tuple(str(d) for d in datasets), images=len(images), memory=memory.scope)
    return Profile(
        target=manifest.target, model=manifest.model.name, backend=manifest.backend,
        bundle=str(bundle.root.resolve()),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=device_info(), versions=library_versions(manifest), settings=settings,
        engines=tuple(entries), quality=quality, adaptive=adaptive, pareto=pareto,
        notes=tuple(dict.fromkeys(notes)), video=video)


def results_path(profile: Profile, results_dir: Path | None = None) -> Path:
    """``<results_dir>/<target>/<model>.json`` (default results dir: ``profiles/results``)."""
    folder = (results_dir or RESULTS_DIR) / _UNSAFE.sub("_", profile.target)
    return folder / f"{_UNSAFE.sub('_', profile.model)}.json"


def save_profile(profile: Profile, bundle_root: Path, *, results_dir: Path | None = None,
                 update_bundle: bool = True) -> Path | None:
    """Write the results copy (only with ``results_dir``: never into the package's own
    committed results) and (by default) the bundle's ``profile.json`` + manifest.

    Returns the results path (None without ``results_dir``).
    """
    data = profile.to_json()
    path = None if results_dir is None else results_path(profile, results_dir)
    if path is not None:
        try:
            atomic_write_json(path, data)
        except OutputError as err:
            raise OutputError(f"{err}; choose another folder with --results DIR") from err
    if update_bundle:
        manifest = read_manifest(bundle_root)
        try:
            atomic_write_json(bundle_root / PROFILE_NAME, data)
            write_manifest(bundle_root, replace(manifest, profile=PROFILE_NAME))
        except OutputError as err:
            copy = "" if path is None else f" (the results copy is at {path})"
            raise BundleError(f"cannot write the profile into bundle {bundle_root}: {err}{copy}"
                              ) from err
    return path

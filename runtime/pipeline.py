"""The run loop: decode -> dispatch -> encode in three overlapping stages, stats and engine maps.

:func:`run_pipeline` runs a decode thread (pulling frames from an iterator), the dispatcher on the
calling thread and an encode thread (calling a sink per result), joined by bounded queues
(:data:`QUEUE_SIZE` frames each), so the engines never wait on I/O while the queues are fed and
memory stays flat over a clip: at most ``2 * QUEUE_SIZE + 3`` frames are alive, and the stats keep
running totals (plus one small :class:`FrameRecord` per frame only when per-frame stats are asked
for). An error in any stage (or Ctrl-C on the calling thread) stops the decoder, lets the encoder
finish the frames already dispatched, joins both threads and is re-raised on the calling thread.

:func:`upscale_video` and :func:`upscale_images` are the jobs ``adasr run`` runs on top of it.
Fault policy: videos follow :mod:`runtime.video` (the output name appears only on success; on an
error or Ctrl-C the frames done are kept, playable, in ``NAME.partial.EXT`` and the error says
so); images are written one by one, each atomically, so a bad file in a folder stops the run with
the images before it complete and nothing half-written.

:func:`draw_engine_map` paints which engine ran each tile over the SR frame: a fixed colour per
engine from the cheapest (green) to the reference (red), tile borders and a legend.
"""

from __future__ import annotations

import colorsys
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from runtime.dispatch import STAGES, FrameResult, rung_fab
from runtime.errors import AdasrError, ConfigError, MediaError
from runtime.imaging import icc_profile, load_rgb, save_rgb
from runtime.manifest import Manifest
from runtime.outputs import deferred_signals
from runtime.policies import rung_order
from runtime.video import EncoderSettings, VideoWriter, probe, read_frames

__all__ = ["IMAGE_SUFFIXES", "QUEUE_SIZE", "STATS_SCHEMA", "FrameRecord", "RunStats", "Upscaler",
           "draw_engine_map", "engine_colours", "image_jobs", "is_image", "run_pipeline",
           "upscale_images", "upscale_video"]

QUEUE_SIZE = 4
# Files read as images (PIL); anything else is opened as a video (PyAV).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                  ".pnm")
STATS_SCHEMA = "adasr.run-stats/1"
Frame = npt.NDArray[np.uint8]
RGB = tuple[int, int, int]
_POLL_S = 0.1  # how often a blocked stage checks whether it should stop


class Upscaler(Protocol):
    """What the loop needs of a :class:`runtime.dispatch.Dispatcher`."""

    def upscale(self, frame: Frame) -> FrameResult: ...

    def reset(self) -> None: ...


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """What the stats keep of one frame (no pixels): a few hundred bytes."""

    index: int
    histogram: Mapping[str, int]  # engine -> tiles
    fab: float
    seconds: Mapping[str, float]  # dispatcher stages, plus "upscale": the whole call
    name: str | None = None  # the input file (images)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"index": self.index}
        if self.name is not None:
            record["name"] = self.name
        record.update(engines=dict(self.histogram), fab=round(self.fab, 4),
                      seconds={k: round(v, 6) for k, v in self.seconds.items()})
        return record


@dataclass(frozen=True)
class RunStats:
    """What a run did: totals, where the time went and (when kept) the per-frame records."""

    frames: int
    fab_total: float  # sum of the per-frame FAB
    histogram: Mapping[str, int]  # engine -> tiles, over all frames
    stage_seconds: Mapping[str, float]  # dispatcher stage -> seconds, over all frames
    wall_s: float  # first frame requested to last frame written
    decode_s: float  # decode thread, reading and converting frames
    encode_s: float  # encode thread, the sink (encoding, maps, writing files)
    starved_s: float  # dispatcher waiting for a decoded frame
    blocked_s: float  # dispatcher waiting for room in the encode queue
    records: tuple[FrameRecord, ...] = ()  # one per frame with keep_records, else none

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_fab(self) -> float:
        return self.fab_total / self.frames if self.frames else 0.0

    def to_json(self) -> dict[str, Any]:
        summary = {
            "frames": self.frames, "fps": round(self.fps, 3), "fab": round(self.mean_fab, 4),
            "engines": dict(self.histogram),
            "seconds": {
                "wall": round(self.wall_s, 6), "decode": round(self.decode_s, 6),
                "encode": round(self.encode_s, 6), "starved": round(self.starved_s, 6),
                "blocked": round(self.blocked_s, 6),
                **{k: round(v, 6) for k, v in self.stage_seconds.items()},
            },
        }
        return {"schema": STATS_SCHEMA, "summary": summary,
                "frames": [r.to_json() for r in self.records]}


class _Failure:
    """An exception raised in a worker thread, carried to the calling thread by a queue."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()  # the producer is done


def _put(box: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set while waiting for room; True when it was put."""
    while not stop.is_set():
        try:
            box.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


class _Loop:
    """The state of one :func:`run_pipeline` call (queues, threads, timings)."""

    def __init__(self, frames: Iterable[Frame], sink: Callable[[int, FrameResult], None],
                 queue_size: int) -> None:
        self.frames = frames
        self.sink = sink
        self.decoded: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self.results: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self.stop = threading.Event()  # decoder: stop reading; encoder failed: stop feeding it
        self.encode_error: BaseException | None = None
        self.decode_s = 0.0
        self.encode_s = 0.0

    def decode(self) -> None:
        iterator: Iterator[Frame] = iter(self.frames)
        try:
            while not self.stop.is_set():
                start = time.perf_counter()
                frame = next(iterator, None)
                self.decode_s += time.perf_counter() - start
                if frame is None or not _put(self.decoded, frame, self.stop):
                    break
            _put(self.decoded, _END, self.stop)
        except BaseException as error:  # carried to the calling thread
            _put(self.decoded, _Failure(error), self.stop)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def encode(self) -> None:
        try:
            while True:
                item = self.results.get()
                if item is _END:
                    return
                index, result = cast(tuple[int, FrameResult], item)
                start = time.perf_counter()
                self.sink(index, result)
                self.encode_s += time.perf_counter() - start
        except BaseException as error:  # carried to the calling thread
            self.encode_error = error
            self.stop.set()

    def next_frame(self) -> Frame | None:
        """The next decoded frame; None at the end or when the encoder failed."""
        while True:
            try:
                item = self.decoded.get(timeout=_POLL_S)
            except queue.Empty:
                if self.encode_error is not None:
                    return None
                continue
            if item is _END:
                return None
            if isinstance(item, _Failure):
                raise item.error
            return cast(Frame, item)

    def finish(self, encoder: threading.Thread, decoder: threading.Thread) -> None:
        """Let the encoder write what it was given, stop the decoder, join both."""
        while encoder.is_alive():
            try:
                self.results.put(_END, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        encoder.join()
        self.stop.set()
        decoder.join()


def run_pipeline(frames: Iterable[Frame], upscaler: Upscaler,
                 sink: Callable[[int, FrameResult], None], *, manifest: Manifest,
                 names: Sequence[str] | None = None, independent: bool = False,
                 on_frame: Callable[[FrameRecord], None] | None = None,
                 keep_records: bool = True, queue_size: int = QUEUE_SIZE) -> RunStats:
    """Upscale every frame of ``frames`` with ``upscaler``, handing each result to ``sink``.

    ``frames`` is iterated on a decode thread, ``sink(index, result)`` runs on an encode thread,
    in frame order; ``on_frame`` (progress) runs on the calling thread after each frame.
    ``independent``: :meth:`Upscaler.reset` before every frame (unrelated images). ``names``:
    the input name of each frame, for the records. ``keep_records=False`` keeps totals only, so
    memory does not grow with the clip at all. See the module docstring for errors.
    """
    loop = _Loop(frames, sink, queue_size)
    decoder = threading.Thread(target=loop.decode, name="adasr-decode", daemon=True)
    encoder = threading.Thread(target=loop.encode, name="adasr-encode", daemon=True)
    records: list[FrameRecord] = []
    histogram: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    frames_done, fab_total, starved, blocked = 0, 0.0, 0.0, 0.0
    start = time.perf_counter()
    decoder.start()
    encoder.start()
    try:
        while True:
            wait = time.perf_counter()
            frame = loop.next_frame()
            tick = time.perf_counter()
            starved += tick - wait
            if frame is None:
                break
            if independent:
                upscaler.reset()
            result = upscaler.upscale(frame)
            del frame
            seconds = {stage: float(result.seconds.get(stage, 0.0)) for stage in STAGES}
            seconds["upscale"] = time.perf_counter() - tick
            index = frames_done
            record = FrameRecord(index, result.histogram, result.fab(manifest), seconds,
                                 None if names is None else names[index])
            frames_done += 1
            fab_total += record.fab
            histogram.update(record.histogram)
            stages.update(seconds)
            if keep_records:
                records.append(record)
            wait = time.perf_counter()
            if not _put(loop.results, (index, result), loop.stop):
                break
            del result
            blocked += time.perf_counter() - wait
            if on_frame is not None:
                on_frame(record)
    finally:
        with deferred_signals():  # the encoder must finish before a caller closes its files
            loop.finish(encoder, decoder)
    if loop.encode_error is not None:
        raise loop.encode_error
    return RunStats(frames_done, fab_total, dict(histogram), dict(stages),
                    time.perf_counter() - start, loop.decode_s, loop.encode_s, starved, blocked,
                    tuple(records))


# --- engine maps -----------------------------------------------------------------------------

_MAP_ALPHA = 112  # tint weight out of 256
_BORDER = (24, 24, 24)


def engine_colours(order: Sequence[str]) -> dict[str, RGB]:
    """A fixed colour per engine along ``order`` (cheapest first): green, yellow, ... red."""
    colours = {}
    for rank, name in enumerate(order):
        hue = (1 / 3) * (1 - rank / (len(order) - 1)) if len(order) > 1 else 0.0
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.9, 0.95)
        colours[name] = (round(red * 255), round(green * 255), round(blue * 255))
    return colours


def draw_engine_map(result: FrameResult, colours: Mapping[str, RGB], manifest: Manifest) -> Frame:
    """The SR frame tinted per tile core by the colour of its engine, tile borders and a legend
    (the frame's FAB, then per engine: colour, name, FAB, tiles it ran)."""
    from PIL import Image, ImageDraw, ImageFont

    plan, scale = result.plan, result.plan.scale
    rows, cols = len(plan.y_starts), len(plan.x_starts)
    names = list(colours)
    code = {name: index for index, name in enumerate(names)}
    labels = np.array([code[name] for name in result.engines]).reshape(rows, cols)
    heights = [plan.tiles[row * cols].core.h * scale for row in range(rows)]
    widths = [plan.tiles[col].core.w * scale for col in range(cols)]
    label_map = np.repeat(np.repeat(labels, heights, axis=0), widths, axis=1)
    palette = np.array([colours[name] for name in names], dtype=np.uint16)
    tinted = (result.sr.astype(np.uint16) * (256 - _MAP_ALPHA)
              + palette[label_map] * _MAP_ALPHA) >> 8
    painted = tinted.astype(np.uint8)
    painted[np.cumsum(heights)[:-1]] = _BORDER
    painted[:, np.cumsum(widths)[:-1]] = _BORDER

    image = Image.fromarray(painted)
    draw = ImageDraw.Draw(image)
    size = max(10, min(image.height, image.width) // 24)
    font = ImageFont.load_default(size=size)
    counts = result.histogram
    lines: list[tuple[str | None, str]] = [(None, f"FAB {result.fab(manifest):.2f}")]
    lines += [(name, f"{name} (FAB {rung_fab(manifest, name):g}): {counts.get(name, 0)} tiles")
              for name in names]
    width = max(draw.textlength(text, font=font) for _, text in lines)
    pad = max(2, size // 4)
    draw.rectangle((0, 0, int(width) + size + 3 * pad, len(lines) * (size + pad) + pad),
                   fill=(0, 0, 0))
    for row, (name, text) in enumerate(lines):
        top = pad + row * (size + pad)
        if name is not None:
            draw.rectangle((pad, top, pad + size, top + size), fill=colours[name])
        draw.text((2 * pad + size, top), text, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8)


# --- jobs --------------------------------------------------------------------------------------


def is_image(path: Path) -> bool:
    """True for a file name with an image suffix (:data:`IMAGE_SUFFIXES`)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def image_jobs(source: Path, output: Path) -> list[tuple[Path, Path]]:
    """``(input, output)`` image pairs: one image file to ``output`` (an image file name), or
    every image of the folder ``source`` (sorted, not recursive) to ``output/<stem>.png``, or
    ``output/<name>.png`` (``a.jpg.png``) when two images share a stem (``a.jpg``, ``a.png``)."""
    if source.is_dir():
        if output.exists() and not output.is_dir():
            raise ConfigError(f"the input {source} is a folder, so the output must be a folder; "
                              f"{output} is a file")
        if output.resolve() == source.resolve():
            raise ConfigError(f"output folder {output} is the input folder: choose another")
        images = sorted(p for p in source.iterdir() if p.is_file() and is_image(p))
        if not images:
            raise MediaError(f"folder {source} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        stems = Counter(path.stem.casefold() for path in images)
        return [(path, output / f"{path.stem if stems[path.stem.casefold()] == 1 else path.name}"
                 ".png") for path in images]
    if not is_image(output):
        raise ConfigError(f"output {output} of image {source} must be an image file "
                          f"({', '.join(IMAGE_SUFFIXES)})")
    if output.resolve() == source.resolve():
        raise ConfigError(f"output {output} is the input: choose another name")
    return [(source, output)]


def _check_video_output(source: Path, output: Path) -> None:
    if is_image(output) or output.is_dir():
        raise ConfigError(f"output {output} of video {source} must be a video file name "
                          "(.mp4, .mkv or .mov)")
    if output.resolve() == source.resolve():
        raise ConfigError(f"output {output} is the input: choose another name")


def upscale_video(source: Path, output: Path, upscaler: Upscaler, manifest: Manifest, *,
                  map_path: Path | None = None, settings: EncoderSettings | None = None,
                  limit: int | None = None, keep_records: bool = True,
                  on_frame: Callable[[FrameRecord], None] | None = None) -> RunStats:
    """Upscale the video ``source`` into ``output`` (H.264, the input's frame rate and audio).

    ``map_path``: also write the engine map video there. ``limit``: the first frames only.
    On an error the AdasrError (same type) names the partial file kept; Ctrl-C is re-raised as a
    KeyboardInterrupt whose message names it.
    """
    for path in (output, map_path):
        if path is not None:
            _check_video_output(source, path)
    info = probe(source)
    upscaler.reset()
    colours = engine_colours(rung_order(manifest))
    writers: list[VideoWriter] = []

    def sink(index: int, result: FrameResult) -> None:
        writers[0].write(result.sr)
        if map_path is not None:
            writers[1].write(draw_engine_map(result, colours, manifest))

    try:
        writers.append(VideoWriter(output, info.fps, audio_from=source, settings=settings))
        if map_path is not None:
            writers.append(VideoWriter(map_path, info.fps, settings=settings))
        stats = run_pipeline(read_frames(source, limit=limit), upscaler, sink, manifest=manifest,
                             on_frame=on_frame, keep_records=keep_records)
        for writer in writers:
            writer.commit()
    except (Exception, KeyboardInterrupt) as error:
        kept = [path for path in (writer.abort() for writer in writers) if path is not None]
        done = writers[0].frames_written if writers else 0
        note = (f"the {done} frames done are in "
                f"{' and '.join(map(str, kept))}" if kept else "no frame was written")
        if isinstance(error, AdasrError):
            raise type(error)(f"{error}; {note}") from error
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(note) from error
        raise
    return stats


def upscale_images(jobs: Sequence[tuple[Path, Path]], upscaler: Upscaler, manifest: Manifest, *,
                   map_paths: Sequence[Path] | None = None, keep_records: bool = True,
                   on_frame: Callable[[FrameRecord], None] | None = None) -> RunStats:
    """Upscale each ``(input, output)`` image file; ``map_paths``: an engine map PNG per job."""
    colours = engine_colours(rung_order(manifest))

    def sink(index: int, result: FrameResult) -> None:
        icc = icc_profile(jobs[index][0])
        save_rgb(jobs[index][1], result.sr, icc=icc)
        if map_paths is not None:
            save_rgb(map_paths[index], draw_engine_map(result, colours, manifest), icc=icc)

    return run_pipeline((load_rgb(path) for path, _ in jobs), upscaler, sink, manifest=manifest,
                        names=[path.name for path, _ in jobs], independent=True,
                        on_frame=on_frame, keep_records=keep_records)

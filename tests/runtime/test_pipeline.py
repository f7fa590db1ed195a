"""runtime.pipeline: the threaded loop (order, overlap, errors, Ctrl-C, flat memory), stats,
engine maps and the video / image jobs, with fake engines behind the real dispatcher."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from runtime.dispatch import STAGES, Dispatcher, FrameResult
from runtime.engines.fake import FakeEngine
from runtime.errors import ConfigError, EngineError, MediaError
from runtime.manifest import Manifest
from runtime.pipeline import (
    QUEUE_SIZE,
    STATS_SCHEMA,
    FrameRecord,
    RunStats,
    draw_engine_map,
    engine_colours,
    image_jobs,
    run_pipeline,
    upscale_images,
    upscale_video,
)
from runtime.tiling import plan_tiles
from runtime.video import VideoWriter, probe, read_frames
from tests.runtime.conftest import make_manifest
from tests.runtime.test_video import psnr, smooth_frames, truncated_clip

Frame = npt.NDArray[np.uint8]
BIAS = {"a4": 0, "a6": 1, "fp32": 2}  # uint8 steps each fake engine adds


@pytest.fixture
def manifest() -> Manifest:
    return make_manifest()  # a4 (offset -1), a6 (0, +1), fp32 reference; tile 16, overlap 4, x2


def dispatcher(manifest: Manifest, policy: str = "threshold") -> Dispatcher:
    engines = {name: FakeEngine(name, 2, bias=BIAS[name] / 255) for name in manifest.names}
    return Dispatcher(manifest, engines, policy=policy)


def nearest(frame: Frame, scale: int = 2) -> Frame:
    return frame.repeat(scale, 0).repeat(scale, 1)


def frames_of(count: int, height: int = 40, width: int = 56) -> list[Frame]:
    return smooth_frames(count, height, width)


class Slow:
    """An upscaler stand-in: sleeps, then returns the dispatcher's result; may raise at a frame."""

    def __init__(self, inner: Dispatcher, delay_s: float = 0.0, fail_at: int | None = None,
                 error: BaseException | None = None) -> None:
        self.inner, self.delay_s, self.fail_at, self.error = inner, delay_s, fail_at, error
        self.calls = 0
        self.resets = 0

    def upscale(self, frame: Frame) -> FrameResult:
        if self.calls == self.fail_at and self.error is not None:
            raise self.error
        self.calls += 1
        time.sleep(self.delay_s)
        return self.inner.upscale(frame)

    def reset(self) -> None:
        self.resets += 1
        self.inner.reset()


class Source:
    """A frame iterator that may sleep per frame, fail at a frame, and records being closed."""

    def __init__(self, frames: list[Frame], delay_s: float = 0.0, fail_at: int | None = None):
        self.frames, self.delay_s, self.fail_at = frames, delay_s, fail_at
        self.closed = False

    def __iter__(self) -> Iterator[Frame]:
        try:
            for index, frame in enumerate(self.frames):
                if index == self.fail_at:
                    raise MediaError(f"frame {index} is corrupt")
                time.sleep(self.delay_s)
                yield frame
        finally:
            self.closed = True


def no_worker_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("adasr-")]


def test_frames_come_out_in_order_with_stats(manifest: Manifest) -> None:
    frames = frames_of(7)
    written: list[tuple[int, Frame]] = []
    seen: list[FrameRecord] = []
    with dispatcher(manifest, policy="fixed:a6") as upscaler:
        stats = run_pipeline(frames, upscaler, lambda i, r: written.append((i, r.sr)),
                             manifest=manifest, on_frame=seen.append)
    assert [i for i, _ in written] == list(range(7))
    for (_, sr), frame in zip(written, frames, strict=True):
        assert np.array_equal(sr, nearest(frame) + 1)  # fake a6 adds one level
    tiles = len(plan_tiles(40, 56, 16, 4, 2))
    assert tiles == 15  # 3 rows x 5 columns
    assert stats.frames == 7 and stats.histogram == {"a6": 7 * tiles}
    assert stats.mean_fab == pytest.approx(6.0)
    assert [r.index for r in seen] == list(range(7)) and seen == list(stats.records)
    assert set(stats.records[0].seconds) == {*STAGES, "upscale"}
    assert stats.fps == pytest.approx(7 / stats.wall_s)
    payload = stats.to_json()
    assert payload["schema"] == STATS_SCHEMA and len(payload["frames"]) == 7
    assert payload["summary"]["engines"] == {"a6": 7 * 15} and payload["summary"]["frames"] == 7
    assert {"wall", "decode", "encode", "starved", "blocked", *STAGES} <= set(
        payload["summary"]["seconds"])
    assert payload["frames"][3] == {"index": 3, "engines": {"a6": 15}, "fab": 6.0,
                                    "seconds": payload["frames"][3]["seconds"]}
    assert no_worker_threads()


def test_decode_dispatch_and_encode_overlap(manifest: Manifest) -> None:
    """Each stage sleeps 25 ms per frame: in a pipeline 12 frames take about 12 x 25 ms, not
    12 x 75 ms, and the dispatcher is hardly ever left waiting for a frame."""
    delay, count = 0.025, 12
    with dispatcher(manifest, policy="fixed:a4") as inner:
        stats = run_pipeline(Source(frames_of(count), delay_s=delay), Slow(inner, delay),
                             lambda i, r: time.sleep(delay), manifest=manifest)
    serial = 3 * delay * count
    assert stats.wall_s < 0.6 * serial
    assert stats.decode_s >= delay * count * 0.9 and stats.encode_s >= delay * count * 0.9
    assert stats.starved_s < 0.5 * delay * count


def test_a_decode_error_stops_the_run_after_writing_the_frames_before(
        manifest: Manifest) -> None:
    source = Source(frames_of(10), fail_at=6)
    written: list[int] = []
    with dispatcher(manifest) as upscaler, pytest.raises(MediaError, match="frame 6 is corrupt"):
        run_pipeline(source, upscaler, lambda i, r: written.append(i), manifest=manifest)
    assert written == list(range(6)) and source.closed and no_worker_threads()


def test_an_encode_error_propagates_and_stops_the_decoder(manifest: Manifest) -> None:
    source = Source(frames_of(200))

    def sink(index: int, result: FrameResult) -> None:
        if index == 3:
            raise MediaError("disk full")

    with dispatcher(manifest) as upscaler, pytest.raises(MediaError, match="disk full"):
        run_pipeline(source, upscaler, sink, manifest=manifest)
    assert source.closed and no_worker_threads()


@pytest.mark.parametrize("error", [KeyboardInterrupt(), EngineError("engine 'a4' crashed")])
def test_ctrl_c_or_an_engine_error_finishes_the_dispatched_frames(
        manifest: Manifest, error: BaseException) -> None:
    source = Source(frames_of(50))
    written: list[int] = []
    with dispatcher(manifest) as inner, pytest.raises(type(error)):
        run_pipeline(source, Slow(inner, fail_at=5, error=error),
                     lambda i, r: written.append(i), manifest=manifest)
    assert written == list(range(5)) and source.closed and no_worker_threads()


def test_memory_stays_flat_over_a_clip(manifest: Manifest) -> None:
    """Peak traced memory over 150 frames is a handful of frames (bounded queues), and what a
    run keeps is nothing per frame, or a small record per frame when asked for."""
    frame = frames_of(1, 96, 128)[0]
    engine = FakeEngine("a4", 2)

    def forget_calls(index: int, result: FrameResult) -> None:
        engine.calls.clear()  # the fake engine's own test log would grow per frame

    def measure(keep_records: bool) -> tuple[int, int, RunStats]:
        def frames() -> Iterator[Frame]:
            for _ in range(150):
                yield frame.copy()

        with Dispatcher(manifest, {"a4": engine}, policy="fixed:a4") as upscaler:
            upscaler.upscale(frame)  # warm the dispatcher's buffers
            tracemalloc.start()
            stats = run_pipeline(frames(), upscaler, forget_calls, manifest=manifest,
                                 keep_records=keep_records)
            kept, high = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        return kept, high, stats

    sr_bytes = frame.nbytes * 4
    kept, high, stats = measure(keep_records=False)
    # the queued frames plus the dispatcher's float32 work arrays: a handful of frames
    assert high < (2 * QUEUE_SIZE + 3 + 8) * sr_bytes
    assert kept < sr_bytes  # nothing per frame: less than one frame kept after 150
    assert stats.records == () and stats.frames == 150 and stats.histogram == {"a4": 150 * 88}
    with_records, _, stats = measure(keep_records=True)
    assert len(stats.records) == 150 and (with_records - kept) / 150 < 2048  # bytes per frame


def test_engine_colours_run_from_green_to_red() -> None:
    colours = engine_colours(["a4", "a6", "a8", "fp32"])
    assert list(colours) == ["a4", "a6", "a8", "fp32"]
    red, green, _ = colours["a4"]
    assert green > 200 and red < 60
    red, green, _ = colours["fp32"]
    assert red > 200 and green < 60
    assert len(set(colours.values())) == 4
    assert engine_colours(["only"]) == {"only": colours["fp32"]}


def test_engine_map_tints_each_tile_with_its_engine(manifest: Manifest) -> None:
    frame = np.full((64, 200, 3), 128, np.uint8)
    frame[:, 100:] = np.random.default_rng(1).integers(0, 255, (64, 100, 3))  # right: busy
    with dispatcher(manifest) as upscaler:
        result = upscaler.upscale(frame)
    colours = engine_colours(["a4", "a6", "fp32"])
    painted = draw_engine_map(result, colours, manifest)
    assert painted.shape == result.sr.shape and painted.dtype == np.uint8
    # a pixel inside the bottom-left (flat, a4) and bottom-right (busy, a6) tile cores
    assert result.engines[-len(result.plan.x_starts)] == "a4" and result.engines[-1] == "a6"
    for y, x, name in ((120, 10, "a4"), (120, 390, "a6")):
        tint = (result.sr[y, x].astype(int) * 144 + np.array(colours[name]) * 112) >> 8
        assert np.array_equal(painted[y, x], tint)
    border = result.plan.tiles[1].core.x0 * 2  # the first vertical tile border
    assert np.array_equal(painted[100:120, border], np.full((20, 3), 24))
    assert painted[2:20, 2:20].std() > 20  # the legend, drawn top left


def write_video(path: Path, frames: list[Frame], fps: Fraction = Fraction(24)) -> Path:
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def test_upscale_video_writes_frames_rate_and_map(tmp_path: Path, manifest: Manifest) -> None:
    frames = frames_of(9, 48, 64)
    source = write_video(tmp_path / "in.mp4", frames)
    decoded = list(read_frames(source))
    with dispatcher(manifest, policy="fixed:a6") as upscaler:
        stats = upscale_video(source, tmp_path / "out.mp4", upscaler, manifest,
                              map_path=tmp_path / "map.mp4", limit=8)
    assert stats.frames == 8
    for name in ("out.mp4", "map.mp4"):
        info = probe(tmp_path / name)
        assert (info.width, info.height, info.fps, info.frames) == (128, 96, Fraction(24), 8)
    out = list(read_frames(tmp_path / "out.mp4"))
    assert min(psnr(o, nearest(d) + 1) for o, d in zip(out, decoded, strict=False)) > 38.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "map.mp4", "out.mp4"]


def test_a_truncated_video_keeps_its_good_frames_in_a_partial_file(
        tmp_path: Path, manifest: Manifest) -> None:
    cut = truncated_clip(tmp_path)
    output = tmp_path / "out.mp4"
    with dispatcher(manifest) as upscaler, pytest.raises(MediaError) as error:
        upscale_video(cut, output, upscaler, manifest)
    message = str(error.value)
    assert "cut.mp4 is" in message and "truncated" in message and "\n" not in message
    done = int(message.split("; the ")[1].split(" frames done")[0])
    assert done >= 5 and str(tmp_path / "out.partial.mp4") in message
    assert not output.exists()
    assert probe(tmp_path / "out.partial.mp4").frames == done
    assert len(list(read_frames(tmp_path / "out.partial.mp4"))) == done


def test_ctrl_c_leaves_a_valid_partial_video(tmp_path: Path, manifest: Manifest) -> None:
    source = write_video(tmp_path / "in.mp4", frames_of(12))
    with dispatcher(manifest) as inner, pytest.raises(KeyboardInterrupt) as interrupt:
        upscale_video(source, tmp_path / "out.mp4", Slow(inner, fail_at=4,
                                                         error=KeyboardInterrupt()), manifest)
    assert str(interrupt.value) == f"the 4 frames done are in {tmp_path / 'out.partial.mp4'}"
    assert len(list(read_frames(tmp_path / "out.partial.mp4"))) == 4
    assert not (tmp_path / "out.mp4").exists()


def test_video_output_names_are_checked(tmp_path: Path, manifest: Manifest) -> None:
    source = write_video(tmp_path / "in.mp4", frames_of(1))
    upscaler = dispatcher(manifest)
    for output, message in ((tmp_path / "out.png", "must be a video file name"),
                            (source, "is the input")):
        with pytest.raises(ConfigError, match=message):
            upscale_video(source, output, upscaler, manifest)


def test_images_of_any_mode_become_rgb_pngs(tmp_path: Path, manifest: Manifest) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = frames_of(1, 21, 33)[0]  # odd size
    Image.fromarray(rgb).save(folder / "a_rgb.jpg", quality=95)
    Image.fromarray(rgb[:, :, 1]).save(folder / "b_gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])).save(
        folder / "c_rgba.png")
    (folder / "notes.txt").write_text("not an image")
    jobs = image_jobs(folder, tmp_path / "out")
    maps = [path for _, path in image_jobs(folder, tmp_path / "maps")]
    assert [(i.name, o.name) for i, o in jobs] == [
        ("a_rgb.jpg", "a_rgb.png"), ("b_gray.png", "b_gray.png"), ("c_rgba.png", "c_rgba.png")]
    upscaler = Slow(dispatcher(manifest, policy="fixed:a4"))
    with upscaler.inner:
        stats = upscale_images(jobs, upscaler, manifest, map_paths=maps)
    assert [r.name for r in stats.records] == ["a_rgb.jpg", "b_gray.png", "c_rgba.png"]
    assert upscaler.resets == 3  # each image on its own
    gray = np.asarray(Image.open(tmp_path / "out" / "b_gray.png"))
    assert gray.shape == (42, 66, 3)
    assert np.array_equal(gray, nearest(np.repeat(rgb[:, :, 1:2], 3, axis=2)))
    rgba = np.asarray(Image.open(tmp_path / "out" / "c_rgba.png"))
    assert np.array_equal(rgba, nearest(rgb))
    assert np.asarray(Image.open(tmp_path / "maps" / "a_rgb.png")).shape == (42, 66, 3)
    assert isinstance(stats, RunStats) and stats.histogram == {"a4": 3 * 6}


def test_a_corrupt_image_stops_the_run_after_the_images_before(tmp_path: Path,
                                                               manifest: Manifest) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(frames_of(1)[0]).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(frames_of(1)[0]).save(folder / "c.png")
    with dispatcher(manifest) as upscaler, pytest.raises(MediaError, match="b.png"):
        upscale_images(image_jobs(folder, tmp_path / "out"), upscaler, manifest)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


@pytest.mark.parametrize(("make", "output", "error", "message"), [
    (lambda d: d, "out.mp4", ConfigError, "must be a folder"),
    (lambda d: d, ".", ConfigError, "is the input folder"),
    (lambda d: d / "x.png", "out.mp4", ConfigError, "must be an image file"),
])
def test_image_job_errors(tmp_path: Path, make: Callable[[Path], Path], output: str,
                          error: type[Exception], message: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(frames_of(1)[0]).save(folder / "x.png")
    (tmp_path / "out.mp4").write_bytes(b"")
    target = folder if output == "." else tmp_path / output
    with pytest.raises(error, match=message):
        image_jobs(make(folder), target)


def test_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="holds no image"):
        image_jobs(tmp_path, tmp_path / "out")

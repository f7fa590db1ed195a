"""runtime.cluster / ``adasr cluster``: on a real local Ray cluster (this machine, 2 CPUs), started
once for the module and shut down at its end; every test is bounded by an alarm.

Frames are compared exactly: outputs are encoded losslessly (``crf 0``) and decoded, and the
per-frame engine histograms (taken before encoding) are compared with the single-process run's.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from types import FrameType

import av
import numpy as np
import numpy.typing as npt
import pytest
import ray
from PIL import Image

from compiler.cli import main
from runtime.bundle import open_bundle
from runtime.cluster.job import ClusterInput, connect, plan_inputs, run_job
from runtime.cluster.join import join_segments
from runtime.cluster.progress import JobProgress
from runtime.cluster.worker import DispatchSettings, frame_digest, sweep_dead_chunk_folders
from runtime.dispatch import Dispatcher, FrameResult
from runtime.errors import ConfigError, MediaError
from runtime.imaging import load_rgb, save_rgb
from runtime.pipeline import RunStats, upscale_images, upscale_video
from runtime.video import EncoderSettings, VideoWriter, read_frames

Frame = npt.NDArray[np.uint8]
REPO = Path(__file__).resolve().parents[2]
TEST_LIMIT_S = 180
LOSSLESS = EncoderSettings(crf=0)


@pytest.fixture(scope="module", autouse=True)
def local_cluster() -> Iterator[None]:
    """A local Ray cluster for the module: 2 CPUs, loopback, no dashboard."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with connect(None, num_cpus=2):
        yield
    assert not ray.is_initialized()


@pytest.fixture(autouse=True)
def time_limit() -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"cluster test ran over {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def busy_frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> list[Frame]:
    """Blocks of noise whose strength drifts per frame, so tile complexities wander around the
    tiny bundle's thresholds and the hysteresis keeps changing engines."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        base = np.kron(rng.random((height // 8, width // 8, 3)), np.ones((8, 8, 1)))
        strength = np.kron(rng.random((height // 16, width // 16, 1)), np.ones((16, 16, 1)))
        noise = rng.random((height, width, 3)) * strength * (0.1 + 0.1 * (index % 4))
        frames.append(np.round(np.clip(base * 0.5 + noise, 0, 1) * 255).astype(np.uint8))
    return frames


def write_clip(path: Path, frames: list[Frame], fps: Fraction = Fraction(24), *,
               audio: bool = False, faststart: bool = False) -> Path:
    """A lossless H.264 clip of ``frames`` (plus a 440 Hz AAC tone with ``audio``; ``faststart``:
    index first, so a cut copy still opens)."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        video = out.add_stream("libx264", rate=fps, options={"crf": "0"})
        video.width, video.height, video.pix_fmt = frames[0].shape[1], frames[0].shape[0], \
            "yuv444p"
        sound = out.add_stream("aac", rate=48000, layout="mono") if audio else None
        for index, pixels in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            picture.pts = index
            out.mux(video.encode(picture))
        out.mux(video.encode(None))
        if sound is not None:
            samples = int(48000 * len(frames) / fps) + 2048
            tone = np.sin(np.arange(samples) * 2 * np.pi * 440 / 48000).astype(np.float32)
            for start in range(0, samples, 1024):
                block = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="flt",
                                                   layout="mono")
                block.sample_rate, block.pts = 48000, start
                out.mux(sound.encode(block))
            out.mux(sound.encode(None))
    return path


def settings(bundle: Path, hysteresis: float = 0.3) -> DispatchSettings:
    return DispatchSettings(bundle=bundle, hysteresis=hysteresis, threads=1, encoder=LOSSLESS)


class Digesting:
    """An upscaler that records the digest of every SR frame it makes."""

    def __init__(self, inner: Dispatcher) -> None:
        self.inner, self.digests = inner, list[str]()

    def upscale(self, frame: Frame) -> FrameResult:
        result = self.inner.upscale(frame)
        self.digests.append(frame_digest(result.sr))
        return result

    def reset(self) -> None:
        self.inner.reset()


def single_process(source: Path, output: Path, spec: DispatchSettings,
                   digests: list[str] | None = None) -> RunStats:
    bundle = open_bundle(spec.bundle)
    with spec.dispatcher(bundle) as dispatcher:
        upscaler = Digesting(dispatcher)
        stats = upscale_video(source, output, upscaler, bundle.manifest, settings=spec.encoder)
    if digests is not None:
        digests.extend(upscaler.digests)
    return stats


def histograms(records: object) -> list[dict[str, int]]:
    return [dict(record.histogram) for record in records]  # type: ignore[attr-defined]


def assert_same_video(a: Path, b: Path) -> None:
    first, second = list(read_frames(a)), list(read_frames(b))
    assert len(first) == len(second) > 0
    for index, (x, y) in enumerate(zip(first, second, strict=True)):
        assert np.array_equal(x, y), f"frame {index} differs"
    with av.open(str(a)) as left, av.open(str(b)) as right:
        times = [[(f.pts, f.time_base) for f in c.decode(c.streams.video[0])]
                 for c in (left, right)]
    assert times[0] == times[1]


def reset_at(source: Path, spec: DispatchSettings, starts: set[int]) -> list[Frame]:
    """The frames of one process that forgets the hysteresis at ``starts``."""
    bundle = open_bundle(spec.bundle)
    with spec.dispatcher(bundle) as dispatcher:
        frames = []
        for index, frame in enumerate(read_frames(source)):
            if index in starts:
                dispatcher.reset()
            frames.append(dispatcher.upscale(frame).sr)
        return frames


def test_cluster_frames_equal_one_process_across_chunk_boundaries(tiny_bundle: Path,
                                                                  tmp_path: Path) -> None:
    source = write_clip(tmp_path / "in.mp4", busy_frames(30))
    spec = settings(tiny_bundle)
    digests: list[str] = []
    single = single_process(source, tmp_path / "single.mp4", spec, digests)
    output = tmp_path / "out" / "cluster.mp4"
    report = run_job(plan_inputs([source], output), spec, workers=2, chunk_frames=7,
                     digests=True)
    assert report.outputs == ((output, 30),) and report.retried == 0
    assert list(report.digests) == digests and len(set(digests)) == 30  # RGB, before encoding
    assert len(set(report.chunk_workers.values())) == 2  # both workers made chunks
    assert_same_video(tmp_path / "single.mp4", output)
    assert histograms(report.records) == histograms(single.records)
    assert [r.index for r in report.records] == list(range(30))
    # The clip exercises the carried state: forgetting it at the chunk starts changes frames.
    starts = set(range(7, 30, 7))
    with VideoWriter(tmp_path / "reset.mp4", Fraction(24), settings=LOSSLESS) as writer:
        for frame in reset_at(source, spec, starts):
            writer.write(frame)
    assert any(not np.array_equal(x, y) for x, y in
               zip(read_frames(tmp_path / "reset.mp4"), read_frames(output), strict=True))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cluster.mp4"]


def test_audio_and_frame_timing_are_kept(tiny_bundle: Path, tmp_path: Path) -> None:
    source = write_clip(tmp_path / "in.mp4", busy_frames(20, seed=1), Fraction(30000, 1001),
                        audio=True)
    spec = settings(tiny_bundle, hysteresis=0.1)
    single_process(source, tmp_path / "single.mp4", spec)
    report = run_job(plan_inputs([source], tmp_path / "cluster.mp4"), spec, workers=2,
                     chunk_frames=6)
    assert report.frames == 20
    assert_same_video(tmp_path / "single.mp4", tmp_path / "cluster.mp4")
    packets = []
    for name in ("single.mp4", "cluster.mp4"):
        with av.open(str(tmp_path / name)) as container:
            stream = container.streams.audio[0]
            assert container.streams.video[0].average_rate == Fraction(30000, 1001)
            packets.append([(p.pts, p.duration, bytes(p)) for p in container.demux(stream)
                            if p.dts is not None])
    assert packets[0] == packets[1] and len(packets[0]) > 10


def test_a_worker_killed_mid_chunk_has_its_chunk_retried(tiny_bundle: Path,
                                                         tmp_path: Path) -> None:
    source = write_clip(tmp_path / "in.mp4", busy_frames(96, seed=2))
    spec = settings(tiny_bundle)
    digests: list[str] = []
    single = single_process(source, tmp_path / "single.mp4", spec, digests)
    killed: list[str] = []

    def kill_one(progress: JobProgress) -> None:
        for attempt in progress.running.values():
            if not killed and 1 <= attempt.frames <= 8:  # well inside a 24-frame chunk
                killed.append(attempt.worker)
                os.kill(int(attempt.worker.rsplit(":", 1)[1]), signal.SIGKILL)

    output = tmp_path / "cluster.mp4"
    report = run_job(plan_inputs([source], output), spec, workers=2, chunk_frames=24,
                     on_progress=kill_one, poll_s=0.02, digests=True)
    assert killed and report.retried >= 1
    assert report.frames == 96 and [r.index for r in report.records] == list(range(96))
    assert list(report.digests) == digests
    assert_same_video(tmp_path / "single.mp4", output)
    assert histograms(report.records) == histograms(single.records)


def test_many_inputs_videos_and_image_folders_into_one_folder(tiny_bundle: Path,
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    images = busy_frames(5, 48, 48, seed=3)
    for index, image in enumerate(images):
        save_rgb(folder / f"p{index}.png", image[: 33 + index])  # sizes differ
    clip = write_clip(tmp_path / "clip.mp4", busy_frames(9, seed=4))
    out = tmp_path / "out"
    inputs = plan_inputs([clip, folder], out)
    assert inputs == [ClusterInput(clip, out / "clip.mp4", True),
                      ClusterInput(folder, out / "photos", False)]
    spec = settings(tiny_bundle)
    report = run_job(inputs, spec, workers=2, chunk_frames=2)
    assert [frames for _, frames in report.outputs] == [9, 5]
    bundle = open_bundle(tiny_bundle)
    alone = [(source, tmp_path / "alone" / target.name) for source, target in inputs[1].images()]
    with spec.dispatcher(bundle) as dispatcher:
        upscale_images(alone, dispatcher, bundle.manifest)
    single_process(clip, tmp_path / "single.mp4", spec)
    assert_same_video(tmp_path / "single.mp4", out / "clip.mp4")
    for index in range(5):
        made = load_rgb(out / "photos" / f"p{index}.png")
        assert made.shape == ((33 + index) * 2, 96, 3)
        assert np.array_equal(made, load_rgb(tmp_path / "alone" / f"p{index}.png"))
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "photos"]


def test_an_output_exists_only_when_complete(tiny_bundle: Path, tmp_path: Path) -> None:
    good = write_clip(tmp_path / "good.mp4", busy_frames(8))
    whole = write_clip(tmp_path / "whole.mp4", busy_frames(40, seed=5), faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    out = tmp_path / "out"
    with pytest.raises(MediaError, match="truncated|corrupt") as error:
        run_job(plan_inputs([good, cut], out), settings(tiny_bundle), workers=2,
                chunk_frames=4)
    message = str(error.value)
    done = int(message.split("; the ")[1].split(" frames done")[0])
    assert f"frames done are in {out / 'cut.partial.mp4'}" in message and "\n" not in message
    assert done >= 4 and done % 4 == 0  # the chunks back, in order
    assert sorted(p.name for p in out.iterdir()) == ["cut.partial.mp4", "good.mp4"]
    assert len(list(read_frames(out / "good.mp4"))) == 8  # finished before the fault
    assert len(list(read_frames(out / "cut.partial.mp4"))) == done


def test_input_plans_and_cli_checks(tiny_bundle: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    clip = write_clip(tmp_path / "a.mp4", busy_frames(3))
    (tmp_path / "sub").mkdir()
    twin = write_clip(tmp_path / "sub" / "a.mp4", busy_frames(3))
    with pytest.raises(ConfigError, match="would both write"):
        plan_inputs([clip, twin], tmp_path / "out")
    with pytest.raises(ConfigError, match="go into a folder"):
        plan_inputs([clip, twin], clip)
    with pytest.raises(ConfigError, match="does not exist"):
        plan_inputs([tmp_path / "nope.mp4"], tmp_path / "o.mp4")
    base = ["cluster", str(clip), "--bundle", str(tiny_bundle), "--crf", "0"]
    assert main([*base, "-o", str(clip), "--force"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main([*base, "-o", str(twin)]) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "b.mp4"), "--save-map", "m.mp4"]) == 2
    assert "--save-map is not supported" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "b.mp4"), "--workers", "3"]) == 2
    assert "do not fit the cluster's 2 CPUs" in capsys.readouterr().err
    engine = tiny_bundle / "engines" / "a4.onnx"
    engine.write_bytes(engine.read_bytes() + b"\0")
    assert main([*base, "-o", str(tmp_path / "c.mp4")]) == 2
    assert "a4.onnx fails its checksum" in capsys.readouterr().err
    engine.write_bytes(engine.read_bytes()[:-1])
    stats = tmp_path / "stats.json"
    assert main([*base, "-o", str(tmp_path / "b.mp4"), "--chunk-frames", "2",
                 "--stats", str(stats)]) == 0
    captured = capsys.readouterr()
    assert "3 frames" in captured.out and "on 2 workers" in captured.out
    assert "adasr cluster: 3/3 frames (100%)" in captured.err  # line progress: not a terminal
    assert len(list(read_frames(tmp_path / "b.mp4"))) == 3
    assert '"retried_chunks": 0' in stats.read_text()


def test_segments_of_other_parameters_are_not_joined(tmp_path: Path) -> None:
    parts = []
    for index, crf in enumerate((0, 30)):
        with VideoWriter(tmp_path / f"{index}.mp4", Fraction(25),
                         settings=EncoderSettings(crf=crf, preset="ultrafast" if index
                                                  else "fast")) as writer:
            for frame in busy_frames(2):
                writer.write(frame)
        parts.append(tmp_path / f"{index}.mp4")
    with pytest.raises(MediaError, match="other stream parameters"):
        join_segments(parts, tmp_path / "joined.mp4", Fraction(25))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.mp4", "1.mp4"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's pydantic fields
def test_serve_answers_images_and_batches_engines_across_requests(tiny_bundle: Path) -> None:
    from ray import serve

    from runtime.cluster.serve import ENGINES, ServeOptions, build_app

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    spec = DispatchSettings(bundle=tiny_bundle, threads=1)
    images = busy_frames(4, seed=6)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(spec, ServeOptions(max_batch=8, batch_wait_s=0.3)), name="t",
                  route_prefix="/")

        def post(body: bytes) -> tuple[int, bytes]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()

        bodies = []
        for image in images:
            encoded = io.BytesIO()
            Image.fromarray(image).save(encoded, format="PNG")
            bodies.append(encoded.getvalue())
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, bodies))
        merged = serve.get_deployment_handle(ENGINES, "t").merged.remote().result()
        status, message = post(b"not an image")
    finally:
        serve.shutdown()
    bundle = open_bundle(tiny_bundle)
    with spec.dispatcher(bundle) as dispatcher:
        for image, (code, body) in zip(images, answers, strict=True):
            dispatcher.reset()
            assert code == 200
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))),
                                  dispatcher.upscale(image).sr)
    assert max(count for _, count in merged) > 1  # calls of several requests in one batch
    assert status == 400 and b"cannot read image" in message


def test_sweep_removes_only_dead_workers_chunk_folders(tmp_path: Path) -> None:
    """A SIGKILLed worker's segment folder goes when the next worker starts; live workers' and
    anything not named by a worker stay."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = tmp_path / f"adasr-chunk-{int(child.stdout)}-abc"
    live = tmp_path / f"adasr-chunk-{os.getpid()}-def"
    other = tmp_path / "adasr-chunk-notapid-x"
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "segment.mp4").write_bytes(b"partial")
    assert sweep_dead_chunk_folders(tmp_path) == [dead]
    assert not dead.exists() and (live / "segment.mp4").exists() and other.exists()

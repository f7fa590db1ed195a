"""``adasr profile --video``: every rung and the default adaptive policy on frames of a real clip,
Y-PSNR and VMAF NEG against the original frames, stored in profile.json and reported."""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.cli import main
from profiles.profiler import RESULTS_DIR, ProfileOptions, default_video, profile_bundle
from profiles.report import compare_table, markdown_report, terminal_report
from profiles.schema import Profile, profile_from_json, read_profile
from profiles.video import MAX_FRAMES, Clip, load_clip, measure_video
from runtime.bundle import open_bundle
from runtime.errors import ConfigError, MediaError
from runtime.fileio import atomic_write_bytes
from runtime.manifest import write_manifest
from runtime.metrics import psnr_y
from runtime.resize import imresize_bicubic
from runtime.rungs import LossModel, Rung, RungLadder
from runtime.tiling import plan_tiles
from runtime.vmaf import vmaf_neg
from tests.conftest import require_shared
from tests.profiles.conftest import ENGINES, SCALE
from tests.runtime.conftest import make_manifest, nearest_onnx

CLIP = "video/carphone_pristine.mp4"  # 176 x 144: LR 88 x 72
FRAMES = 3
OPTIONS = ProfileOptions(batches=(4,), threads=(1,), runs=2, warmup=1, repeat=1, layer_runs=0,
                         frame_repeats=1, quick=True, video_frames=FRAMES)


def _cubic_onnx(scale: int) -> bytes:
    """An ONNX model: N x 3 x H x W float -> bicubic (a = -0.5, half-pixel) upscale by scale."""
    node = helper.make_node("Resize", ["lr", "", "scales"], ["sr"], mode="cubic",
                            cubic_coeff_a=-0.5)
    scales = numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales")
    graph = helper.make_graph(
        [node], "cubic",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["n", 3, "sh", "sw"])],
        [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def ladder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with a rung ladder: bicubic (interpolation), ``near`` (nearest neighbour), top
    ``cubic`` (an ONNX bicubic resize); its default policy is ``quality``."""
    root = tmp_path_factory.mktemp("ladder") / "bundle"
    atomic_write_bytes(root / "engines" / "near.onnx", nearest_onnx(SCALE, 0.0))
    atomic_write_bytes(root / "engines" / "cubic.onnx", _cubic_onnx(SCALE))
    atomic_write_bytes(root / "calibration.json", b'{"schema": "adasr.calibration/1"}\n')
    manifest = make_manifest({"near": ((-1, 0, 1), 8.0), "cubic": ((), 32.0)}, root=root,
                             machine=(platform.machine(),))
    ladder = RungLadder(rungs=(
        Rung("bicubic", None, 0.1, LossModel((np.log(0.05), 0, 0, 1, 0, 0))),
        Rung("near", "near", 1.0, LossModel((np.log(0.5), 0, 0, 1, 0, 0))),
        Rung("cubic", "cubic", 4.0)), reference_error=LossModel((np.log(10.0), 0, 0, 0, 0, 0)))
    write_manifest(root, replace(manifest, rungs=ladder))
    return root


@pytest.fixture(scope="module")
def clip() -> Clip:
    return load_clip(require_shared(CLIP), FRAMES, SCALE)


def test_load_clip(clip: Clip) -> None:
    assert len(clip.hr) == len(clip.lr) == FRAMES and clip.requested == FRAMES
    assert clip.hr[0].shape == (144, 176, 3) and clip.lr[0].shape == (72, 88, 3)
    np.testing.assert_array_equal(clip.lr[1], imresize_bicubic(clip.hr[1], 0.5))


def test_every_rung_and_the_quality_policy_on_the_clip(ladder_bundle: Path, clip: Clip) -> None:
    video = measure_video(open_bundle(ladder_bundle), clip, batch=4, threads=1)
    assert (video.frames, video.width, video.height, video.top) == (FRAMES, 176, 144, "cubic")
    assert video.vmaf_model == "vmaf_v0.6.1neg" and video.hysteresis == 0.1
    assert [(p.name, p.policy) for p in video.policies] == [
        ("bicubic", "fixed:bicubic"), ("near", "fixed:near"), ("cubic", "fixed:cubic"),
        ("adaptive", "quality")]
    tiles = len(plan_tiles(72, 88, 16, 4, SCALE)) * FRAMES  # the tiny bundles' tile / overlap
    for p in video.policies:
        assert 0 <= p.vmaf_neg <= 100 and 20 < p.psnr < 60
        assert p.fps > 0 and p.ms_per_frame == pytest.approx(1000 / p.fps)
        assert sum(p.histogram.values()) == tiles
        if p.policy.startswith("fixed:"):
            assert p.histogram == {p.name: tiles}
    rows = {p.name: p for p in video.policies}
    # the same numbers computed here without the dispatcher: nearest neighbour, MATLAB bicubic
    near = [lr.repeat(SCALE, axis=0).repeat(SCALE, axis=1) for lr in clip.lr]
    assert rows["near"].psnr == pytest.approx(
        np.mean([psnr_y(sr, hr, SCALE) for sr, hr in zip(near, clip.hr, strict=True)]),
        abs=1e-9)
    assert rows["near"].vmaf_neg == pytest.approx(vmaf_neg(near, clip.hr)[0], abs=1e-6)
    bicubic = [imresize_bicubic(lr, SCALE) for lr in clip.lr]
    assert rows["bicubic"].psnr == pytest.approx(
        np.mean([psnr_y(sr, hr, SCALE) for sr, hr in zip(bicubic, clip.hr, strict=True)]),
        abs=0.01)
    # the top rung is the best rung: bicubic is its twin (within 0.05 dB), nearest far below
    top = rows["cubic"]
    for other in (rows["bicubic"], rows["near"]):
        assert top.psnr >= other.psnr - 0.05 and top.vmaf_neg >= other.vmaf_neg - 0.5
    assert top.psnr > rows["near"].psnr + 1.0 and top.vmaf_neg > rows["near"].vmaf_neg + 1.0


@pytest.fixture(scope="module")
def profile(module_bundle: Path, benchmark_dir: Path) -> Profile:
    return profile_bundle(module_bundle, replace(OPTIONS, datasets=(benchmark_dir,),
                                                 video=require_shared(CLIP)))


def test_profile_records_the_threshold_default_and_round_trips(profile: Profile) -> None:
    video = profile.video
    assert video is not None and video.top == "fp32" and video.frames == FRAMES
    assert [p.policy for p in video.policies] == [*(f"fixed:{n}" for n in ENGINES), "threshold"]
    psnr = {p.name: p.psnr for p in video.policies}
    # the tiny engines add a bias of 0, 1/255, 2/255 to nearest neighbour: in that order
    assert psnr["a4"] > psnr["a6"] > psnr["fp32"]
    assert set(video.policies[-1].histogram) <= set(ENGINES)
    data = json.loads(json.dumps(profile.to_json()))
    assert data["schema"] == "adasr.profile/1"
    assert {"clip", "frames", "width", "height", "vmaf_model", "top", "policies"} <= set(
        data["video"])
    assert {"name", "policy", "psnr", "vmaf_neg", "fps", "ms_per_frame", "histogram"} == set(
        data["video"]["policies"][0])
    assert profile_from_json(data) == profile
    # an older profile (no video field, or null) still reads
    del data["video"]
    assert profile_from_json(data) == replace(profile, video=None)


def test_committed_profiles_read_without_video() -> None:
    paths = sorted(RESULTS_DIR.glob("*/*.json"))
    assert paths
    for path in paths:
        assert read_profile(path).video is None


def test_reports_show_the_video_table(profile: Profile) -> None:
    text = terminal_report(profile)
    assert "VMAF NEG" in text and "threshold" in text and "fixed:a6" in text
    assert "loss vs top" in text and "+0.0000" in text  # fp32, the top, against itself
    markdown = markdown_report(profile)
    assert "## Video quality" in markdown and "| adaptive (threshold) |" in markdown


def test_cli_video_plot(module_bundle: Path, benchmark_dir: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    clip = require_shared(CLIP)
    out, plots = tmp_path / "p.json", tmp_path / "plots"
    assert main(["profile", str(module_bundle), "--no-bundle", "--json", str(out), "--plots",
                 str(plots), "--dataset", str(benchmark_dir), "--quick", "--runs", "2",
                 "--batch", "4", "--layer-runs", "0", "--video", str(clip), "--video-frames",
                 "2"]) == 0
    captured = capsys.readouterr()
    assert f"video {clip.name} frame 2/2: 4 policies" in captured.err
    assert read_profile(out).video is not None
    assert (plots / "video.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![video](video.png)" in (plots / "report.md").read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (["--video-frames", "0"], f"--video-frames must be in 1..{MAX_FRAMES}, got 0"),
    (["--video-frames", "100000"], f"--video-frames must be in 1..{MAX_FRAMES}, got 100000"),
    (["--video", "V", "--no-video"], "--video V and --no-video contradict"),
    (["--video", "no/such.mp4"], "video file not found: no/such.mp4"),
    (["--video", "NOTVIDEO"], "not a video"),
])
def test_bad_video_input_is_one_line(module_bundle: Path, benchmark_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], extra: list[str],
                                     message: str) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    extra = [str(text) if value == "NOTVIDEO" else value for value in extra]
    assert main(["profile", str(module_bundle), "--no-bundle", "--plots", str(tmp_path / "p"),
                 "--dataset", str(benchmark_dir), "--quick", "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("adasr profile: error: ")
    assert message in err
    assert not (tmp_path / "p").exists()  # refused before measuring


def test_options_and_loader_refuse_bad_values(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = f"video frames must be an integer in 1..{MAX_FRAMES}"
    for frames in (0, MAX_FRAMES + 1, True):
        with pytest.raises(ConfigError, match=allowed):
            ProfileOptions(video_frames=frames)
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(MediaError, match="x.png is corrupt or truncated"):
        load_clip(image, 2, SCALE)
    import runtime.video

    sizes = [(8, 8), (6, 8)]
    monkeypatch.setattr(runtime.video, "read_frames", lambda path, limit: iter(
        np.zeros((*size, 3), np.uint8) for size in sizes))
    with pytest.raises(MediaError, match=r"frame size changes within the first 2 frames "
                                         r"\(8x6, 8x8\)"):
        load_clip(image, 2, SCALE)
    sizes = [(1, 9)]
    with pytest.raises(MediaError, match="frames of 9x1 are too small to downscale by 2"):
        load_clip(image, 1, SCALE)


def test_default_video_is_the_shared_carphone(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    clip = tmp_path / "video" / "carphone_pristine.mp4"
    clip.parent.mkdir()
    clip.write_bytes(b"")
    monkeypatch.setenv("ADASR_SHARED_DATA", str(tmp_path))
    assert default_video() == clip


def test_without_the_vmaf_tool(module_bundle: Path, benchmark_dir: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """The default clip is skipped with a note; an explicit one is refused before measuring."""
    import runtime.vmaf
    from profiles.command import _video

    def missing() -> str:
        raise ConfigError("VMAF needs the imageio-ffmpeg package")

    monkeypatch.setattr(runtime.vmaf, "ffmpeg_path", missing)
    clip = tmp_path / "video" / "carphone_pristine.mp4"
    clip.parent.mkdir()
    clip.write_bytes(b"")
    monkeypatch.setenv("ADASR_SHARED_DATA", str(tmp_path))
    args = argparse.Namespace(video=None, no_video=False)
    assert _video(args) is None
    assert capsys.readouterr().err == (f"adasr profile: no video quality on {clip}: VMAF needs "
                                       "the imageio-ffmpeg package\n")
    with pytest.raises(ConfigError, match="imageio-ffmpeg"):
        profile_bundle(module_bundle, replace(OPTIONS, datasets=(benchmark_dir,), video=clip))


def test_compare_shows_the_video_rows(profile: Profile) -> None:
    video = profile.video
    assert video is not None
    slower = replace(profile, video=replace(video, policies=tuple(
        replace(p, ms_per_frame=p.ms_per_frame * 2) for p in video.policies)))
    table = compare_table(profile, slower)
    rows = [line for line in table.splitlines() if line.startswith(("fixed:", "threshold"))]
    assert len(rows) == len(ENGINES) + 1 and all("2.00x" in row for row in rows)
    assert "B VMAF NEG" in table
    assert "VMAF" not in compare_table(profile, replace(profile, video=None))


def test_own_folder_keeps_no_stale_video_plot(tiny_bundle: Path, benchmark_dir: Path) -> None:
    args = ["profile", str(tiny_bundle), "--dataset", str(benchmark_dir), "--quick", "--runs",
            "2", "--batch", "4", "--layer-runs", "0", "--quiet", "--video-frames", "1"]
    assert main([*args, "--video", str(require_shared(CLIP))]) == 0
    folder = tiny_bundle / "profile"
    assert (folder / "video.png").is_file()
    assert read_profile(tiny_bundle / "profile.json").video is not None
    assert main([*args, "--no-video"]) == 0  # a re-run replaces its own folder
    assert {p.name for p in folder.iterdir()} == {"latency.png", "pareto.png", "layers.png",
                                                  "report.md"}
    assert read_profile(tiny_bundle / "profile.json").video is None

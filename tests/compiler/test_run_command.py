"""``adasr run`` end to end on a real on-disk bundle of tiny ONNX Runtime engines.

The engines upscale by nearest neighbour and add a bias of 0, 1 or 2 levels (a4, a6, fp32), so
with ``--policy fixed:a6`` the output must be the nearest-neighbour upscale plus one level, up to
H.264 loss.
"""

from __future__ import annotations

import json
import platform
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from compiler.cli import main
from runtime.fileio import atomic_write_bytes
from runtime.manifest import write_manifest
from runtime.video import probe, read_frames
from tests.runtime.conftest import ENGINES, SCALE, make_manifest, nearest_onnx
from tests.runtime.test_video import psnr, smooth_frames, truncated_clip

CARPHONE = "video/carphone_pristine.mp4"
BUNNY = "video/bigbuckbunny.mp4"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle of tests/runtime/conftest.py (engines a4 / a6 / fp32), built once."""
    root = tmp_path_factory.mktemp("bundle") / "tiny-cpu-x86"
    for name, (_, _, bias) in ENGINES.items():
        atomic_write_bytes(root / "engines" / f"{name}.onnx", nearest_onnx(SCALE, bias))
    atomic_write_bytes(root / "calibration.json", b'{"schema": "adasr.calibration/1"}\n')
    write_manifest(root, make_manifest(root=root, machine=(platform.machine(),)))
    return root


def run(*args: str | Path) -> int:
    return main(["run", *map(str, args), "--quiet"])


def nearest(frame: np.ndarray, scale: int = SCALE) -> np.ndarray:
    return frame.repeat(scale, 0).repeat(scale, 1)


def test_video_frames_size_rate_pixels_stats_and_map(
        tmp_path: Path, bundle: Path, shared_file: Callable[[str], Path]) -> None:
    source = shared_file(CARPHONE)
    out, stats, map_path = tmp_path / "out.mp4", tmp_path / "stats.json", tmp_path / "map.mp4"
    assert run(source, "-o", out, "--bundle", bundle, "--policy", "fixed:a6", "--frames", "12",
               "--stats", stats, "--save-map", map_path) == 0
    for path in (out, map_path):
        info = probe(path)
        assert (info.width, info.height, info.fps, info.frames) == (352, 288,
                                                                    Fraction(30000, 1001), 12)
    expected = [nearest(f).astype(np.int16) + 1 for f in read_frames(source, limit=12)]
    got = list(read_frames(out))
    assert min(psnr(g, np.clip(e, 0, 255).astype(np.uint8))
               for g, e in zip(got, expected, strict=True)) > 35.0
    payload = json.loads(stats.read_text())
    tiles = 12 * 15  # 144 x 176 in 16-px tiles with stride 12: 12 rows x 15 columns
    assert payload["schema"] == "adasr.run-stats/1" and payload["policy"] == "fixed:a6"
    assert payload["hysteresis"] == 0.1  # the video default
    summary = payload["summary"]
    assert summary["frames"] == 12 and summary["engines"] == {"a6": 12 * tiles}
    assert summary["fab"] == 6.0 and summary["fps"] > 0
    assert {"wall", "decode", "encode", "tile", "statistic", "group", "infer", "stitch"} <= set(
        summary["seconds"])
    assert [f["index"] for f in payload["frames"]] == list(range(12))
    assert payload["frames"][0]["engines"] == {"a6": tiles} and payload["frames"][0]["fab"] == 6.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.mp4", "out.mp4", "stats.json"]


def test_threshold_policy_mixes_engines_and_keeps_audio(
        tmp_path: Path, bundle: Path, shared_file: Callable[[str], Path]) -> None:
    source = shared_file(BUNNY)
    out, stats = tmp_path / "bunny.mp4", tmp_path / "s.json"
    assert run(source, "-o", out, "--bundle", bundle, "--frames", "2", "--stats", stats,
               "--preset", "ultrafast") == 0
    info = probe(out)
    assert (info.width, info.height, info.frames, info.fps, info.has_audio) == (
        2560, 1440, 2, Fraction(25), True)
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert abs(float(audio.duration * audio.time_base) - 2 / 25) <= 1024 / 48000 + 1e-6
    summary = json.loads(stats.read_text())["summary"]
    assert set(summary["engines"]) == {"a4", "a6"}  # flat sky and busy grass, no fp32 offset
    assert 4.0 < summary["fab"] < 6.0


def test_images_file_and_folder_with_maps(tmp_path: Path, bundle: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = smooth_frames(1, 27, 41)[0]
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((27, 41), 200, np.uint8)])).save(folder / "rgba.png")
    assert run(folder / "gray.png", "-o", tmp_path / "one.png", "--bundle", bundle, "--policy",
               "fixed:fp32", "--save-map", tmp_path / "one_map.png") == 0
    one = np.asarray(Image.open(tmp_path / "one.png"))
    assert one.shape == (54, 82, 3)
    assert np.array_equal(one, nearest(np.repeat(rgb[:, :, :1], 3, axis=2)) + 2)  # fp32: +2
    assert np.asarray(Image.open(tmp_path / "one_map.png")).shape == (54, 82, 3)

    stats = tmp_path / "s.json"
    assert run(folder, "-o", tmp_path / "out", "--bundle", bundle, "--save-map",
               tmp_path / "maps", "--stats", stats) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gray.png", "rgba.png"]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["gray.png", "rgba.png"]
    rgba = np.asarray(Image.open(tmp_path / "out" / "rgba.png"))
    assert rgba.shape == (54, 82, 3)
    assert np.abs(rgba.astype(int) - nearest(rgb)).max() <= 2  # engines add 0..2 levels
    payload = json.loads(stats.read_text())
    assert [f["name"] for f in payload["frames"]] == ["gray.png", "rgba.png"]
    assert payload["hysteresis"] == 0.0  # the image default


def one_line_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("adasr run: error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_a_truncated_video_exits_2_and_keeps_a_playable_partial(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = truncated_clip(tmp_path)
    out = tmp_path / "out.mp4"
    assert run(cut, "-o", out, "--bundle", bundle) == 2
    err = one_line_error(capsys, "cut.mp4 is", "truncated", str(tmp_path / "out.partial.mp4"))
    done = int(err.split("; the ")[1].split(" ")[0])
    assert not out.exists() and done >= 5
    assert len(list(read_frames(tmp_path / "out.partial.mp4"))) == done


def test_ctrl_c_exits_130_and_keeps_a_playable_partial(
        tmp_path: Path, bundle: Path, shared_file: Callable[[str], Path]) -> None:
    """A real SIGINT to ``adasr run`` (slowed to 20 ms per frame) after its third frame."""
    out = tmp_path / "out.mp4"
    code = (
        "import sys, time\n"
        "from runtime.dispatch import Dispatcher\n"
        "from compiler.cli import main\n"
        "original = Dispatcher.upscale\n"
        "def slow(self, frame, calls=[]):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 4:\n"
        "        print('ready', flush=True)\n"
        "    time.sleep(0.02)\n"
        "    return original(self, frame)\n"
        "Dispatcher.upscale = slow\n"
        f"sys.exit(main(['run', {str(shared_file(CARPHONE))!r}, '-o', {str(out)!r}, "
        f"'--bundle', {str(bundle)!r}, '--quiet']))\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    partial = tmp_path / "out.partial.mp4"
    lines = err.splitlines()
    assert child.returncode == 130 and lines[-1] == "adasr run: interrupted", err
    done = int(lines[-2].split("the ")[1].split(" ")[0])
    assert lines[-2] == f"adasr run: the {done} frames done are in {partial}"
    assert 3 <= done < 120 and not out.exists()
    assert probe(partial).frames == done and len(list(read_frames(partial))) == done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial.mp4"]


def test_bad_inputs_and_options_exit_2_with_one_line(
        tmp_path: Path, bundle: Path, shared_file: Callable[[str], Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    video = shared_file(CARPHONE)
    garbage = tmp_path / "noise.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    out = tmp_path / "o.mp4"
    cases: list[tuple[list[str | Path], tuple[str, ...]]] = [
        ([tmp_path / "nope.mp4", "-o", out], ("nope.mp4", "does not exist")),
        ([garbage, "-o", out], ("noise.mp4", "not a video")),
        ([video, "-o", tmp_path / "o.png"], ("o.png", "must be a video file name")),
        ([video, "-o", out, "--policy", "fixed:a5"], ("unknown engine 'a5'", "'a6'")),
        ([video, "-o", out, "--policy", "fastest"], ("unknown policy 'fastest'",)),
        ([video, "-o", out, "--policy", "budget:20"], ("profile",)),
        ([video, "-o", out, "--mode", "tile"], ("unknown dispatch mode 'tile'",)),
        ([video, "-o", out, "--stitch", "blend"], ("stitch mode 'blend'",)),
        ([video, "-o", out, "--frames", "0"], ("--frames must be >= 1",)),
        ([video, "-o", out, "--crf", "70"], ("--crf must be in 0..51, got 70",)),
        ([video, "-o", out, "--bitrate", "fast"], ("--bitrate 'fast'",)),
        ([video, "-o", out, "--codec", "h265"], ("'h265' is not a video encoder",)),
    ]
    for args, fragments in cases:
        assert run(*args, "--bundle", bundle) == 2, args
        one_line_error(capsys, *fragments)
    assert run(video, "-o", out, "--bundle", tmp_path / "missing") == 2
    one_line_error(capsys, "missing does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.mp4"]  # nothing written


def test_a_corrupted_bundle_is_refused(tmp_path: Path, bundle: Path,
                                       shared_file: Callable[[str], Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    engine = broken / "engines" / "a6.onnx"
    engine.write_bytes(engine.read_bytes() + b"\0")
    assert run(shared_file(CARPHONE), "-o", tmp_path / "o.mp4", "--bundle", broken) == 2
    one_line_error(capsys, "a6.onnx fails its checksum")
    assert not (tmp_path / "o.mp4").exists()


def test_run_needs_no_torch(tmp_path: Path, bundle: Path) -> None:
    """``adasr run`` on a device without torch: the command never imports it."""
    image = tmp_path / "x.png"
    Image.fromarray(smooth_frames(1, 20, 20)[0]).save(image)
    code = (
        "import sys\n"
        "from compiler.cli import main\n"
        f"code = main(['run', {str(image)!r}, '-o', {str(tmp_path / 'y.png')!r}, '--bundle', "
        f"{str(bundle)!r}, '--quiet'])\n"
        "heavy = [m for m in ('torch', 'onnx', 'tensorrt', 'pycuda') if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert result.stdout.strip() == "0 []"
    assert np.asarray(Image.open(tmp_path / "y.png")).shape == (40, 40, 3)

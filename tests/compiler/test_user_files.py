"""Issue 14, part A, at the command line: a user's files are never lost, every failure one line.

Each test failed on the code before the output guard: outputs overwrote inputs (``--stats``,
``--save-map``, ``calibrate -o``), ``build -o`` deleted a folder holding any ``manifest.json``,
SIGTERM / SIGHUP left temp files and no partial, ``ulimit -f`` killed the process, numbers
like ``--threads 1000000`` hung or crashed, checkpoints of integers or NaNs were accepted.
User files are compared by sha256 before and after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compiler.cli import main
from compiler.quant.calibrate import CalibrationConfig, calibrate
from compiler.quant.qmodel import QuantSettings
from compiler.quant.record import save_record
from compiler.zoo import load_model
from runtime.imaging import save_rgb
from runtime.video import read_frames
from tests.compiler import test_run_command
from tests.runtime.test_pipeline import frames_of, write_video

REPO = Path(__file__).resolve().parents[2]
bundle = test_run_command.bundle  # the tiny bundle fixture (engines a4 / a6 / fp32)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames_of(8, 32, 48))


@pytest.fixture
def read_only() -> Path:
    """A folder nobody here can create files in (chmod does not bind root: /sys/fs then)."""
    import tempfile

    folder = Path("/sys/fs") if os.geteuid() == 0 else Path(tempfile.mkdtemp())
    if folder != Path("/sys/fs"):
        folder.chmod(0o555)
    try:
        os.close(tempfile.mkstemp(dir=folder)[0])
    except OSError:
        return folder
    pytest.skip(f"{folder} is writable here")


def run(*args: str | Path) -> int:
    return main(["run", *map(str, args), "--quiet"])


# --- adasr run: outputs against inputs and each other ------------------------------------------


def test_run_stats_equal_to_the_input_is_refused(
        tmp_path: Path, bundle: Path, clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sha256(clip)
    assert run(clip, "-o", tmp_path / "out.mp4", "--bundle", bundle, "--stats", clip) == 2
    assert error_line(capsys) == f"adasr run: error: --stats {clip} is an input: choose " \
        "another name"
    assert sha256(clip) == before and list(tmp_path.iterdir()) == []


def test_run_stats_linked_to_the_input_or_into_the_bundle_is_refused(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "in.png"
    save_rgb(image, np.full((20, 24, 3), 7, np.uint8))
    (tmp_path / "soft.json").symlink_to(image)
    os.link(image, tmp_path / "hard.json")
    before, manifest = sha256(image), sha256(bundle / "manifest.json")
    for stats in (tmp_path / "soft.json", tmp_path / "hard.json", bundle / "manifest.json"):
        assert run(image, "-o", tmp_path / "out.png", "--bundle", bundle, "--stats", stats,
                   "--force") == 2
        assert error_line(capsys).startswith(f"adasr run: error: --stats {stats} is an input")
    assert sha256(image) == before and sha256(bundle / "manifest.json") == manifest
    assert not (tmp_path / "out.png").exists()


def test_run_save_map_equal_to_the_output_is_refused(
        tmp_path: Path, bundle: Path, clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.mp4"
    assert run(clip, "-o", out, "--bundle", bundle, "--save-map", out) == 2
    assert error_line(capsys) == f"adasr run: error: --save-map {out} is also the -o output: " \
        "choose another name"


def test_run_refuses_an_existing_output_without_force(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, out = tmp_path / "in.png", tmp_path / "out.png"
    save_rgb(image, np.full((20, 24, 3), 7, np.uint8))
    out.write_bytes(b"the user's picture")
    assert run(image, "-o", out, "--bundle", bundle) == 2
    assert error_line(capsys) == f"adasr run: error: -o {out} exists: give --force to " \
        "overwrite it, or choose another name"
    assert out.read_bytes() == b"the user's picture"
    assert run(image, "-o", out, "--bundle", bundle, "--force") == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_run_on_a_partial_named_input_keeps_it(tmp_path: Path, bundle: Path) -> None:
    source = write_video(tmp_path / "X.partial.mp4", frames_of(5, 32, 48))
    before = sha256(source)
    assert run(source, "-o", tmp_path / "X.mp4", "--bundle", bundle) == 0
    assert sha256(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.mp4", "X.partial.mp4"]


def test_run_folder_with_a_jpg_and_a_png_of_one_name(
        tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    for name in ("a.jpg", "a.png"):
        save_rgb(folder / name, np.full((20, 24, 3), 40, np.uint8))
    out = tmp_path / "out"
    assert main(["run", str(folder), "-o", str(out), "--bundle", str(bundle)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png"]
    assert capsys.readouterr().out.startswith(f"wrote {out}: 2 frames at ")


def test_run_into_a_read_only_folder_is_one_line_before_work(
        bundle: Path, clip: Path, read_only: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.mp4"
    for option, args in (("-o", ["-o", read_only / "o.mp4"]),
                         ("--stats", ["-o", out, "--stats", read_only / "s.json"]),
                         ("--save-map", ["-o", out, "--save-map", read_only / "m.mp4"])):
        assert run(clip, *args, "--bundle", bundle) == 2
        line = error_line(capsys)
        assert line.startswith(f"adasr run: error: cannot write {option} {read_only}/"), line
        assert f"folder {read_only} is not writable (" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--threads", "1000000", "--threads must be in 0..256, got 1000000"),
    ("--bitrate", "1e30", "--bitrate must be in 10k..2G bits/s, got '1e30'"),
    ("--bitrate", "nan", "--bitrate 'nan' is not a bitrate; use bits/s like 8M, 800k or "
     "1500000"),
    ("--batch", "0", "--batch must be in 1..1024, got 0"),
    ("--codec", "aac", "--codec 'aac' is an audio encoder, not a video encoder; video encoders "
     "here: "),
])
def test_run_numbers_and_names_are_one_line(
        option: str, value: str, message: str, tmp_path: Path, bundle: Path, clip: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert run(clip, "-o", tmp_path / "o.mp4", "--bundle", bundle, option, value) == 2
    assert error_line(capsys).startswith(f"adasr run: error: {message}")


def test_run_prints_progress_lines_without_a_terminal(
        tmp_path: Path, bundle: Path, clip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(clip), "-o", str(tmp_path / "o.mp4"), "--bundle", str(bundle)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("upscaling: 8/8 (100%) frames, "), lines


# --- signals and limits (real processes) ----------------------------------------------------

_SLOW_RUN = """
import sys, time
from runtime.dispatch import Dispatcher
from runtime.video import VideoWriter
from compiler.cli import main
original, finish = Dispatcher.upscale, VideoWriter._finish
def slow(self, frame, calls=[]):
    calls.append(1)
    if len(calls) == 4:
        print('ready', flush=True)
    time.sleep(0.05)
    return original(self, frame)
def slow_finish(self):
    print('finishing', flush=True)
    time.sleep(1.0)
    finish(self)
Dispatcher.upscale = slow
VideoWriter._finish = slow_finish
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", frames_of(80, 32, 48))


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGHUP,),
                                     (signal.SIGINT, signal.SIGINT)],
                         ids=["SIGTERM", "SIGHUP", "double-SIGINT"])
def test_signals_keep_a_playable_partial_and_no_temp_file(
        signals: tuple[signal.Signals, ...], tmp_path: Path, bundle: Path,
        long_clip: Path) -> None:
    out = tmp_path / "out.mp4"
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, "run", str(long_clip), "-o", str(out), "--bundle",
         str(bundle), "--quiet"], cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    child.send_signal(signals[0])
    if len(signals) > 1:  # the second one while the partial file is being finished
        assert child.stdout.readline() == "finishing\n"
        child.send_signal(signals[1])
    _, err = child.communicate(timeout=60)
    name = "" if signals[0] == signal.SIGINT else f" ({signals[0].name})"
    lines = err.splitlines()
    assert child.returncode == 128 + signals[0], err
    assert lines[-1] == f"adasr run: interrupted{name}", err
    partial = tmp_path / "out.partial.mp4"
    done = int(lines[-2].split("the ")[1].split(" ")[0])
    assert lines[-2] == f"adasr run: the {done} frames done are in {partial}"
    assert done >= 1 and len(list(read_frames(partial))) == done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial.mp4"]


def _file_limit(size: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@contextlib.contextmanager
def file_limit(size: int) -> Iterator[None]:
    """``ulimit -f`` for this process (the soft limit, restored after). SIGXFSZ is ignored
    meanwhile, as the CLI does, so that pytest's own writes cannot kill the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_file_size_limit_is_one_line_not_a_crash(tmp_path: Path, bundle: Path,
                                                   long_clip: Path) -> None:
    """``ulimit -f``: SIGXFSZ killed the process; now the write fails with one line."""
    done = subprocess.run(
        [sys.executable, "build.py", "run", str(long_clip), "-o", str(tmp_path / "o.mp4"),
         "--bundle", str(bundle), "--quiet"], cwd=REPO, capture_output=True, text=True,
        preexec_fn=_file_limit(3_000), timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"adasr run: error: cannot write video {tmp_path / 'o.mp4'} "), \
        lines
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- adasr calibrate ------------------------------------------------------------------------

_CALIBRATE = ["--steps", "2", "--patches", "4", "--patch-size", "16", "--batch", "2",
              "--quiet"]


@pytest.mark.parametrize("which", ["weights", "calib image"])
def test_calibrate_output_equal_to_an_input_is_refused(
        which: str, tiny: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    weights, calib = tiny
    target = weights if which == "weights" else calib / "img1.png"
    before = sha256(target)
    assert main(["calibrate", "--weights", str(weights), "--calib", str(calib), "-o",
                 str(target), "--force", *_CALIBRATE]) == 2
    assert error_line(capsys) == f"adasr calibrate: error: -o {target} is an input: choose " \
        "another name"
    assert sha256(target) == before


def test_calibrate_refuses_before_calibrating(
        tiny: tuple[Path, Path], tmp_path: Path, read_only: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    weights, calib = tiny
    existing = tmp_path / "record.json"
    existing.write_text("{}")
    for output, message in (
            (existing, f"-o {existing} exists: give --force to overwrite it, or choose another "
             "name"),
            (read_only / "r.json", f"cannot write -o {read_only / 'r.json'}: folder {read_only} "
             "is not writable (")):
        assert main(["calibrate", "--weights", str(weights), "--calib", str(calib), "-o",
                     str(output), *_CALIBRATE]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"adasr calibrate: error: {message}"), captured.err
        assert "calibrating" not in captured.out  # refused before the long work
    assert existing.read_text() == "{}"


def test_calibrate_on_a_file_says_it_is_a_file(tiny: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    weights, calib = tiny
    image = calib / "img0.png"
    assert main(["calibrate", "--weights", str(weights), "--calib", str(image), "-o",
                 str(tmp_path / "r.json"), *_CALIBRATE]) == 2
    assert error_line(capsys) == (f"adasr calibrate: error: --calib {image} is a file, not a "
                                  "folder: give the folder that holds the LR calibration images")


def test_calibrate_under_a_file_size_limit_is_one_line(
        tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights, calib = tiny
    record = tmp_path / "r.json"
    with file_limit(2_000):
        code = main(["calibrate", "--weights", str(weights), "--calib", str(calib), "-o",
                     str(record), *_CALIBRATE])
    assert code == 2
    assert error_line(capsys) == f"adasr calibrate: error: cannot write {record}: File too large"
    assert list(tmp_path.iterdir()) == []


# --- adasr build -o ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def record(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights, calib = tiny
    fast = CalibrationConfig(patches=4, patch_size=16, steps=4, batch=2, epochs=2, validation=2)
    result = calibrate(load_model(weights), QuantSettings(method="adabm", wbits=8, abits=8),
                       fast, calib)
    path = tmp_path_factory.mktemp("record") / "record.json"
    save_record(path, result.record)
    return path


def build(tiny: tuple[Path, Path], record: Path, out: Path, *extra: str) -> int:
    weights, calib = tiny
    return main(["build", "--weights", str(weights), "--calibration", str(record), "--calib",
                 str(calib), "--patch-size", "16", "--target", "cpu-x86", "--tile", "16",
                 "--overlap", "4", "-o", str(out), "--quiet", *extra])


def test_build_never_replaces_a_folder_it_did_not_write(
        tiny: tuple[Path, Path], record: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    app = tmp_path / "webapp"
    (app / "js").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my app", "version": "1.0"}')
    (app / "index.html").write_text("<html></html>")
    (app / "js" / "app.js").write_text("console.log(1)")
    before = tree(app)
    assert build(tiny, record, app) == 2
    assert error_line(capsys) == (
        f"adasr build: error: bundle folder -o {app} exists and is not a bundle adasr wrote (no "
        ".adasr marker and adasr.bundle/1 manifest): refusing to replace it; choose another -o")
    assert tree(app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp"]


def test_build_into_a_file_or_a_read_only_folder_is_refused_before_work(
        tiny: tuple[Path, Path], record: Path, tmp_path: Path, read_only: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    for out, message in (
            (existing, f"bundle folder -o {existing} is a file, not a folder: choose another -o"),
            (read_only / "b", f"cannot write bundle folder -o {read_only / 'b'}: folder "
             f"{read_only} is not writable (")):
        assert build(tiny, record, out) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"adasr build: error: {message}"), captured.err
        assert len(captured.err.splitlines()) == 1 and "[2/4]" not in captured.out
    assert existing.read_text() == "mine"


def test_build_under_a_file_size_limit_is_one_line(
        tiny: tuple[Path, Path], record: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    with file_limit(2_000):
        code = build(tiny, record, out)
    assert code == 2
    assert error_line(capsys) == (f"adasr build: error: cannot write the bundle {out}: File "
                                  "too large; nothing was changed")
    assert list(tmp_path.iterdir()) == []  # no staging folder left


def test_only_folders_that_are_provably_bundles_are_replaced(tmp_path: Path) -> None:
    from compiler.bundle import is_bundle_folder

    legacy = tmp_path / "legacy"  # written before the marker: schema and only bundle files
    (legacy / "engines").mkdir(parents=True)
    (legacy / "manifest.json").write_text('{"schema": "adasr.bundle/1"}')
    (legacy / "engines" / "int8.onnx").write_bytes(b"")
    assert is_bundle_folder(legacy)
    (legacy / "notes.txt").write_text("mine")
    assert not is_bundle_folder(legacy)
    spoof = tmp_path / "spoof"
    spoof.mkdir()
    (spoof / "manifest.json").write_text('{"schema": "something/1"}')
    (spoof / ".adasr").write_text("adasr.bundle/1\n")
    assert not is_bundle_folder(spoof)


def test_build_replaces_its_own_bundle_and_keeps_inputs(
        tiny: tuple[Path, Path], record: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert build(tiny, record, out) == 0
    assert (out / ".adasr").read_text() == "adasr.bundle/1\n"
    first = json.loads((out / "manifest.json").read_text())["build"]["created"]
    assert build(tiny, record, out) == 0  # a re-run: no --force needed for its own bundle
    assert json.loads((out / "manifest.json").read_text())["build"]["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging left
    mine = out / "my_weights.pt"
    mine.write_bytes(tiny[0].read_bytes())
    capsys.readouterr()
    assert build(tiny, record, out, "--weights", str(mine)) == 2
    assert "holds the input" in error_line(capsys) and mine.read_bytes() == tiny[0].read_bytes()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--threads", "1000000", "--threads must be in 0..256, got 1000000"),
    ("--tile", "1000000000", "--tile must be in 8..4096, got 1000000000"),
    ("--engine-batch", "0", "--engine-batch must be in 1..1024, got 0"),
])
def test_build_numbers_are_one_line(option: str, value: str, message: str,
                                    tiny: tuple[Path, Path], record: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert build(tiny, record, tmp_path / "b", option, value) == 2
    assert error_line(capsys) == f"adasr build: error: {message}"


def test_quickstart_replaces_only_its_own_files(tmp_path: Path) -> None:
    from compiler.commands.quickstart import _outputs
    from runtime.errors import OutputError
    from runtime.outputs import mark_folder

    (tmp_path / "compare.png").write_bytes(b"the user's")
    with pytest.raises(OutputError, match="compare.png exists: give --force"):
        _outputs(tmp_path)
    mark_folder(tmp_path, "adasr.quickstart/1")
    assert [p.name for p in _outputs(tmp_path)] == ["chelsea_x2_adaptive.png", "compare.png"]


# --- checkpoints --------------------------------------------------------------------------


@pytest.fixture
def state(tiny: tuple[Path, Path]) -> Iterator[dict[str, torch.Tensor]]:
    yield torch.load(tiny[0], weights_only=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_checkpoints_are_refused(
        dtype: torch.dtype, state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    from runtime.errors import CheckpointError

    path = tmp_path / "w.pt"
    torch.save({k: v.to(dtype) for k, v in state.items()}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    name = str(dtype).removeprefix("torch.")
    assert str(err.value).startswith("w.pt: tensors of a non-floating dtype: ")
    assert f"({name})" in str(err.value)
    assert str(err.value).endswith("weights must be float16/bfloat16/float32/float64")


def test_a_nan_checkpoint_says_so(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    from runtime.errors import CheckpointError

    path = tmp_path / "w.pt"
    broken = dict(state)
    first = next(iter(broken))
    broken[first] = broken[first].clone().fill_(float("nan"))
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value) == (f"w.pt: the checkpoint has non-finite values (NaN or inf) in "
                              f"{first}: it is damaged or from a diverged training run")


def test_params_ema_is_preferred_with_a_note(
        state: dict[str, torch.Tensor], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "basicsr.pth"
    ema = {k: v + 0.5 for k, v in state.items()}
    torch.save({"params": state, "params_ema": ema}, path)
    loaded = load_model(path)
    weight: Any = loaded.model.state_dict()
    first = next(iter(state))
    torch.testing.assert_close(weight[first], ema[first])
    assert capsys.readouterr().err == ("note: basicsr.pth holds both params and params_ema; "
                                       "loading params_ema\n")

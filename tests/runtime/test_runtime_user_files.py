"""Issue 14, part A, runtime side: a user's files are never touched, images are read as they look.

Every test here failed on the code before the output guard (``runtime/outputs.py``): partial
videos replaced or deleted files named ``NAME.partial.EXT``, folders with ``a.jpg`` and ``a.png``
lost one result, EXIF orientation and ICC profiles were dropped, float images came out black.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import MediaError, OutputError
from runtime.imaging import icc_profile, load_rgb, save_rgb
from runtime.manifest import Manifest
from runtime.outputs import Outputs, deferred_signals, is_marked, mark_folder, place_new
from runtime.pipeline import image_jobs, upscale_images, upscale_video
from runtime.progress import LineProgress, progress_bar
from runtime.video import VideoWriter, read_frames
from tests.runtime.test_pipeline import Slow, dispatcher, frames_of, write_video


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def manifest() -> Manifest:
    from tests.runtime.conftest import make_manifest

    return make_manifest()


# --- partial videos never replace or delete a file --------------------------------------------


def test_an_interrupted_run_of_a_partial_named_input_keeps_the_input(
        tmp_path: Path, manifest: Manifest) -> None:
    """``adasr run X.partial.mp4 -o X.mp4`` + Ctrl-C replaced the input with the frames done."""
    source = write_video(tmp_path / "X.partial.mp4", frames_of(10))
    before = sha256(source)
    with dispatcher(manifest) as inner, pytest.raises(KeyboardInterrupt) as interrupt:
        upscale_video(source, tmp_path / "X.mp4",
                      Slow(inner, fail_at=4, error=KeyboardInterrupt()), manifest)
    kept = tmp_path / "X.partial-2.mp4"
    assert str(interrupt.value) == f"the 4 frames done are in {kept}"
    assert sha256(source) == before and len(list(read_frames(kept))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.partial-2.mp4", "X.partial.mp4"]


def test_a_successful_run_keeps_a_file_named_like_its_partial(
        tmp_path: Path, manifest: Manifest) -> None:
    """Success deleted any ``OUTPUT.partial.EXT`` as a stale partial: here it is the input."""
    source = write_video(tmp_path / "X.partial.mp4", frames_of(6))
    before = sha256(source)
    with dispatcher(manifest) as upscaler:
        upscale_video(source, tmp_path / "X.mp4", upscaler, manifest,
                      map_path=tmp_path / "X.partial.partial.mp4")
    assert sha256(source) == before
    assert len(list(read_frames(tmp_path / "X.mp4"))) == 6


def test_abort_picks_a_new_name_when_the_partial_name_is_taken(tmp_path: Path) -> None:
    for name in ("out.partial.mp4", "out.partial-2.mp4"):
        (tmp_path / name).write_bytes(b"user data " + name.encode())
    with pytest.raises(KeyboardInterrupt), VideoWriter(tmp_path / "out.mp4", Fraction(25)) as w:
        for frame in frames_of(3):
            w.write(frame)
        raise KeyboardInterrupt
    assert w.kept == tmp_path / "out.partial-3.mp4" and len(list(read_frames(w.kept))) == 3
    for name in ("out.partial.mp4", "out.partial-2.mp4"):
        assert (tmp_path / name).read_bytes() == b"user data " + name.encode()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_place_new_never_replaces(tmp_path: Path) -> None:
    wanted = tmp_path / "a.partial.mp4"
    wanted.write_bytes(b"mine")
    temp = tmp_path / ".tmp"
    temp.write_bytes(b"new")
    assert place_new(temp, wanted) == tmp_path / "a.partial-2.mp4"
    assert wanted.read_bytes() == b"mine" and not temp.exists()
    assert (tmp_path / "a.partial-2.mp4").read_bytes() == b"new"


# --- the output guard ---------------------------------------------------------------------------


def test_outputs_are_checked_against_inputs_through_links(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(b"input")
    (tmp_path / "soft.json").symlink_to(source)
    os.link(source, tmp_path / "hard.json")
    guard = Outputs([source])
    for name, detail in (("in.png", ""), ("soft.json", f" (the same file as {source})"),
                         ("hard.json", f" (the same file as {source})")):
        with pytest.raises(OutputError) as err:
            guard.claim(tmp_path / name, "--stats")
        assert str(err.value) == f"--stats {tmp_path / name} is an input{detail}: choose " \
            "another name"
    guard.claim(tmp_path / "out.png", "-o")
    with pytest.raises(OutputError, match=r"^--save-map .*out.png is also the -o output"):
        guard.claim(tmp_path / "sub" / ".." / "out.png", "--save-map")


def test_existing_outputs_need_force(tmp_path: Path) -> None:
    existing = tmp_path / "out.json"
    existing.write_text("{}")
    with pytest.raises(OutputError) as err:
        Outputs([]).claim(existing, "--stats")
    assert str(err.value) == f"--stats {existing} exists: give --force to overwrite it, or " \
        "choose another name"
    assert Outputs([], force=True).claim(existing, "--stats") == existing
    with pytest.raises(OutputError, match="is a folder, not a file"):
        Outputs([], force=True).claim(tmp_path, "-o")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        Outputs([]).claim(tmp_path / "file" / "out.png", "-o")


def test_markers_prove_ownership(tmp_path: Path) -> None:
    assert not is_marked(tmp_path, "adasr.bundle/1")
    mark_folder(tmp_path, "adasr.bundle/1")
    assert is_marked(tmp_path, "adasr.bundle/1") and not is_marked(tmp_path, "other/1")
    (tmp_path.parent / "link").symlink_to(tmp_path)
    assert not is_marked(tmp_path.parent / "link", "adasr.bundle/1")


def test_deferred_signals_hold_an_interrupt_until_cleanup_is_done() -> None:
    import signal

    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt), deferred_signals() as received:
        signal.raise_signal(signal.SIGINT)
        steps.append("cleanup finished")
    assert steps == ["cleanup finished"] and received == [signal.SIGINT]
    with deferred_signals(reraise=False) as received:
        signal.raise_signal(signal.SIGTERM)
    assert received == [signal.SIGTERM]


# --- folders of images --------------------------------------------------------------------------


def test_images_sharing_a_stem_get_distinct_outputs(tmp_path: Path, manifest: Manifest) -> None:
    folder = tmp_path / "in"
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "a.png", "b.png"):
        save_rgb(folder / name, rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    jobs = image_jobs(folder, tmp_path / "out")
    assert [out.name for _, out in jobs] == ["a.jpg.png", "a.png.png", "b.png"]
    with dispatcher(manifest) as upscaler:
        stats = upscale_images(jobs, upscaler, manifest)
    assert stats.frames == 3 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.jpg.png", "a.png.png", "b.png"]
    np.testing.assert_array_equal(load_rgb(tmp_path / "out" / "a.png.png")[::2, ::2],
                                  np.clip(load_rgb(folder / "a.png").astype(int) + 1, 0, 255))


# --- images are read as they look -------------------------------------------------------------


def _exif_rotated(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :5] = 255  # a white band on the left of a landscape picture
    loaded = load_rgb(_exif_rotated(tmp_path / "phone.png", pixels, 6))  # rotate 90 CW to view
    assert loaded.shape == (20, 10, 3)
    np.testing.assert_array_equal(loaded, np.rot90(pixels, -1))


@pytest.fixture
def srgb() -> Iterator[bytes]:
    from PIL import ImageCms

    yield ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_icc_profile_is_kept_on_the_output(tmp_path: Path, manifest: Manifest,
                                          srgb: bytes) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(source, icc_profile=srgb)
    out = tmp_path / "out.png"
    with dispatcher(manifest) as upscaler:
        upscale_images([(source, out)], upscaler, manifest)
    assert icc_profile(out) == srgb


@pytest.mark.parametrize("mode", ["F", "I;16"])
def test_float_and_16_bit_images_are_scaled_not_black(tmp_path: Path, mode: str) -> None:
    ramp = np.linspace(0, 1, 40, dtype=np.float32).reshape(5, 8)
    data = ramp if mode == "F" else np.round(ramp * 65535).astype(np.uint16)
    path = tmp_path / "ramp.tif"
    image = Image.fromarray(data)
    assert image.mode == mode
    image.save(path)
    loaded = load_rgb(path)
    np.testing.assert_array_equal(loaded[:, :, 0], np.floor(ramp * 255 + 0.5).astype(np.uint8))
    assert loaded.max() == 255


def test_a_float_image_outside_0_1_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "hdr.tif"
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(path)
    with pytest.raises(MediaError) as err:
        load_rgb(path)
    assert str(err.value) == (f"cannot read image {path}: float samples in [300, 300]; only "
                              "float images in [0, 1] (or 8/16-bit images) are read")


# --- progress in logs -------------------------------------------------------------------------


def test_line_progress_without_a_terminal() -> None:
    stream = io.StringIO()
    bar = LineProgress(50, "calibrating", stream=stream)
    for _ in range(50):
        bar.set_postfix(loss="0.1")
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("calibrating: 5/50 (10%) steps, ") and lines[0].endswith(
        "step/s, loss=0.1")
    assert lines[-1].startswith("calibrating: 50/50 (100%) steps")


def test_progress_bar_is_lines_off_a_terminal_and_silent_when_quiet(
        capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress_bar(2, "upscaling", unit="frame")
    assert isinstance(bar, LineProgress)  # pytest's stderr is no terminal
    bar.update(2)
    bar.close()
    quiet = progress_bar(2, "upscaling", quiet=True)
    quiet.update(2)
    quiet.close()
    assert capsys.readouterr().err.splitlines()[0].startswith("upscaling: 2/2 (100%) frames")
    assert capsys.readouterr().err == ""

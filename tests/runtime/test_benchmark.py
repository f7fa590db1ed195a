"""Benchmark folders, image loading/saving and the model-agnostic evaluation loop."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from runtime.benchmark import BenchmarkImage, BenchmarkSet, evaluate, load_benchmark
from runtime.errors import ConfigError, DatasetError, EngineError, MediaError
from runtime.imaging import load_rgb, mod_crop, save_rgb, to_uint8
from runtime.resize import imresize_bicubic

# Bicubic baseline, Y-PSNR (dB) with `scale` px shaved, from the provided Set5 LR images, as
# measured with these conventions. Papers print 33.66 / 30.39 / 28.42: their MATLAB scripts
# differ in small ways (Y rounding, crop), worth about 0.01 dB.
SET5_BICUBIC_PSNR = {2: 33.6734, 3: 30.4033, 4: 28.4290}
SET5_BICUBIC_SSIM = {2: 0.93029, 3: 0.86891, 4: 0.81114}


def _bicubic(scale: int) -> Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.uint8]]:
    return lambda lr: imresize_bicubic(lr, float(scale))


def _write(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _gradient(height: int, width: int) -> npt.NDArray[np.uint8]:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 7 % 256, cols * 5 % 256, (rows + cols) * 3 % 256], axis=2).astype(
        np.uint8
    )


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_bicubic_baseline(shared_file: Callable[[str], Path], scale: int) -> None:
    images = load_benchmark(shared_file("benchmarks/Set5"), scale)
    assert [image.name for image in images] == ["baby", "bird", "butterfly", "head", "woman"]
    assert {image.lr_source for image in images} == {"provided"}
    result = evaluate(_bicubic(scale), images, scale)
    print(f"Set5 x{scale} bicubic: {result.psnr:.4f} dB, SSIM {result.ssim:.5f}")
    assert result.psnr == pytest.approx(SET5_BICUBIC_PSNR[scale], abs=0.01)
    assert result.ssim == pytest.approx(SET5_BICUBIC_SSIM[scale], abs=1e-4)


def test_generated_lr_equals_provided(shared_file: Callable[[str], Path], tmp_path: Path) -> None:
    hr_file = shared_file("benchmarks/Set5/HR/butterfly.png")
    provided = load_rgb(shared_file("benchmarks/Set5/LR_bicubic/X4/butterflyx4.png"))
    (tmp_path / "HR").mkdir()
    shutil.copy(hr_file, tmp_path / "HR" / hr_file.name)
    [image] = load_benchmark(tmp_path, 4)
    assert image.lr_source == "generated"
    np.testing.assert_array_equal(image.lr, provided)


def test_provided_and_generated_lr(tmp_path: Path) -> None:
    hr = _gradient(26, 31)  # mod-crops to 24x30 at x3... and 26x30 at x2
    _write(tmp_path / "HR" / "a.png", Image.fromarray(hr))
    _write(tmp_path / "HR" / "b.bmp", Image.fromarray(hr[::-1]))
    lr_a = np.full((8, 10, 3), 9, dtype=np.uint8)
    _write(tmp_path / "LR_bicubic" / "X3" / "ax3.png", Image.fromarray(lr_a))
    benchmark = BenchmarkSet.load(tmp_path, 3)
    assert benchmark.name == tmp_path.name and benchmark.scale == 3
    a, b = benchmark.images
    assert (a.name, a.lr_source, b.name, b.lr_source) == ("a", "provided", "b", "generated")
    np.testing.assert_array_equal(a.hr, hr[:24, :30])
    np.testing.assert_array_equal(a.lr, lr_a)
    np.testing.assert_array_equal(b.lr, imresize_bicubic(hr[::-1][:24, :30], 1 / 3))
    assert not a.hr.flags.writeable and not b.lr.flags.writeable
    # At x2 there is no LR_bicubic/X2 folder: everything is generated.
    assert {image.lr_source for image in load_benchmark(tmp_path, 2)} == {"generated"}


def test_grayscale_hr_is_replicated_to_rgb(tmp_path: Path) -> None:
    gray = _gradient(20, 20)[:, :, 0]
    _write(tmp_path / "HR" / "bridge.png", Image.fromarray(gray, mode="L"))
    [image] = load_benchmark(tmp_path, 2)
    assert image.hr.shape == (20, 20, 3) and image.lr.shape == (10, 10, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image.hr[:, :, channel], gray)
    assert np.array_equal(image.lr[:, :, 0], image.lr[:, :, 2])


def test_missing_hr_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"has no HR folder: expected .*HR"):
        load_benchmark(tmp_path / "Set5", 2)


def test_empty_hr_folder(tmp_path: Path) -> None:
    (tmp_path / "HR").mkdir()
    (tmp_path / "HR" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"holds no images \(\.bmp, \.jpeg, \.jpg, \.png\)"):
        load_benchmark(tmp_path, 2)


def test_lr_of_the_wrong_size(tmp_path: Path) -> None:
    _write(tmp_path / "HR" / "a.png", Image.fromarray(_gradient(20, 24)))
    _write(tmp_path / "LR_bicubic" / "X4" / "ax4.png", Image.fromarray(_gradient(5, 5)))
    message = r"ax4\.png has the wrong size: expected 5x6 .* found 5x5"
    with pytest.raises(DatasetError, match=message):
        load_benchmark(tmp_path, 4)


def test_duplicate_names_and_corrupt_hr(tmp_path: Path) -> None:
    _write(tmp_path / "HR" / "a.png", Image.fromarray(_gradient(8, 8)))
    _write(tmp_path / "HR" / "a.bmp", Image.fromarray(_gradient(8, 8)))
    with pytest.raises(DatasetError, match="two images named 'a'"):
        load_benchmark(tmp_path, 2)
    (tmp_path / "HR" / "a.bmp").unlink()
    (tmp_path / "HR" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(MediaError, match=r"cannot read image .*a\.png"):
        load_benchmark(tmp_path, 2)


def _identity_image(name: str, scale: int, lr_height: int = 10) -> BenchmarkImage:
    hr = _gradient(lr_height * scale, 8 * scale)
    return BenchmarkImage(name, hr, imresize_bicubic(hr, 1 / scale), "generated")


def test_evaluate_scores_progress_and_json() -> None:
    images = [_identity_image("x", 2), _identity_image("y", 2, lr_height=11)]
    truth = {image.name: image.hr for image in images}
    seen: list[tuple[int, int, str]] = []

    def oracle(lr: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
        name = next(n for n, hr in truth.items() if hr.shape[0] == lr.shape[0] * 2)
        return truth[name] / 255.0  # float in [0, 1]: rounds back to exactly HR

    result = evaluate(oracle, images, 2, progress=lambda *args: seen.append(args))
    assert seen == [(1, 2, "x"), (2, 2, "y")]
    assert result.psnr == math.inf and result.ssim == pytest.approx(1.0)
    payload = result.to_json()
    assert [entry["name"] for entry in payload["images"]] == ["x", "y"]  # type: ignore[attr-defined]
    assert set(payload) == {"psnr", "ssim", "images"}
    json.dumps(payload)

    blurry = evaluate(_bicubic(2), images, 2)
    assert 10.0 < blurry.psnr < math.inf and blurry.psnr == pytest.approx(
        sum(score.psnr for score in blurry.images) / 2
    )


def test_evaluate_rejects_bad_upscaler_output() -> None:
    images = [_identity_image("x", 2)]
    message = r"returned shape \(10, 8, 3\) for 'x'.*expected \(20, 16, 3\)"
    with pytest.raises(EngineError, match=message):
        evaluate(lambda lr: lr, images, 2)
    with pytest.raises(EngineError, match="dtype int64"):
        evaluate(lambda lr: np.zeros((20, 16, 3), dtype=np.int64), images, 2)
    with pytest.raises(EngineError, match="NaN"):
        evaluate(lambda lr: np.full((20, 16, 3), np.nan), images, 2)
    with pytest.raises(DatasetError, match="no benchmark images"):
        evaluate(_bicubic(2), [], 2)
    with pytest.raises(ConfigError, match="'x' .* was not loaded for scale 4"):
        evaluate(_bicubic(4), images, 4)


@pytest.mark.parametrize("scale", [0, -2, 2.0, True])
def test_bad_scale_is_a_config_error(tmp_path: Path, scale: int) -> None:
    with pytest.raises(ConfigError, match="scale must be a positive integer"):
        load_benchmark(tmp_path, scale)


def test_load_rgb_conversions(tmp_path: Path) -> None:
    rgba = np.dstack([_gradient(4, 5), np.full((4, 5), 7, dtype=np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "rgba.png"), rgba[:, :, :3])
    wide = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "wide.png")[:, :, 1], [[0, 1, 255, 128]])


def test_load_rgb_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"no jpeg here")
    for path in (tmp_path / "missing.png", tmp_path / "bad.jpg", tmp_path):
        with pytest.raises(MediaError) as caught:
            load_rgb(path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_save_rgb_is_atomic_and_round_trips(tmp_path: Path) -> None:
    image = _gradient(6, 7)
    save_rgb(tmp_path / "out.png", image)
    np.testing.assert_array_equal(load_rgb(tmp_path / "out.png"), image)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.png"]
    with pytest.raises(MediaError, match="unknown extension '.xyz'"):
        save_rgb(tmp_path / "out.xyz", image)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.png"]


def test_to_uint8_and_mod_crop() -> None:
    values = np.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 1.0, 2.0])
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 1, 2, 255, 255])
    assert mod_crop(np.zeros((23, 17, 3), dtype=np.uint8), 4).shape == (20, 16, 3)

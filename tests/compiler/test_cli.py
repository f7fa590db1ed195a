"""The adasr command line: exit codes, JSON outputs, one-line errors, the default job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.cli import main
from compiler.zoo.edsr import EDSR
from runtime.imaging import save_rgb


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    weights = root / "tiny.pt"
    torch.save(EDSR(1, 8, 2, 1.0, 255.0).state_dict(), weights)
    rng = np.random.default_rng(0)
    for i in range(2):
        image = np.kron(rng.random((6, 6, 3)), np.ones((8, 8, 1)))
        save_rgb(root / "data" / "HR" / f"im{i}.png", np.round(image * 255).astype(np.uint8))
    return {"weights": weights, "data": root / "data", "root": root}


def test_eval_writes_json(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = setup["root"] / "fp.json"
    code = main(["eval", "--weights", str(setup["weights"]), "--dataset", str(setup["data"]),
                 "--scale", "2", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"psnr", "ssim", "images"} <= set(result)
    assert [im["name"] for im in result["images"]] == ["im0", "im1"]
    assert result["lr_source"] == ["generated"]
    assert "mean" in capsys.readouterr().out


def test_calibrate_then_eval_quantized(setup: dict[str, Path]) -> None:
    record = setup["root"] / "rec.json"
    code = main(["calibrate", "--weights", str(setup["weights"]), "--calib",
                 str(setup["data"] / "HR"), "--wbits", "8", "--abits", "6", "--patches", "4",
                 "--patch-size", "16", "--steps", "4", "--bit-margin", "0.5", "-o", str(record)])
    assert code == 0
    saved = json.loads(record.read_text())
    assert sum(saved["bit_vectors"]["0"]) <= (6 - 0.5) * len(saved["bit_vectors"]["0"])
    assert saved["calibration"]["budget_lowered"] and saved["calibration"]["config"][
        "bit_margin"] == 0.5
    out = setup["root"] / "q.json"
    code = main(["eval", "--weights", str(setup["weights"]), "--calibration", str(record),
                 "--dataset", str(setup["data"]), "--scale", "2", "--tile", "16", "--json",
                 str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert 5.0 <= result["fab"] <= 7.0 and result["bitops"] > 0
    assert sum(result["images"][0]["d_img"].values()) == 4  # a 24x24 LR image in 16px tiles


def test_calibrate_cadyq_then_eval_whole_and_tiled(setup: dict[str, Path]) -> None:
    """``--method cadyq``: the record holds a selector per adaptive layer; eval reports finite
    PSNR / SSIM and a FAB within the candidates 4..8, whole images and tile by tile."""
    import math

    record = setup["root"] / "cadyq.json"
    assert main(["calibrate", "--weights", str(setup["weights"]), "--calib",
                 str(setup["data"] / "HR"), "--method", "cadyq", "--wbits", "8", "--abits", "6",
                 "--patches", "4", "--patch-size", "16", "--steps", "4", "--quiet",
                 "-o", str(record)]) == 0
    saved = json.loads(record.read_text())
    assert saved["settings"]["method"] == "cadyq"
    assert [layer["selector"] is not None for layer in saved["layers"]] == [True, True]
    for tile in (None, 16):
        out = setup["root"] / f"cadyq_{tile}.json"
        assert main(["eval", "--weights", str(setup["weights"]), "--calibration", str(record),
                     "--dataset", str(setup["data"]), "--scale", "2", "--json", str(out),
                     *(["--tile", str(tile)] if tile else [])]) == 0
        result = json.loads(out.read_text())
        assert math.isfinite(result["psnr"]) and result["psnr"] > 10
        assert 0 < result["ssim"] <= 1
        assert 4.0 <= result["fab"] <= 8.0 and result["bitops"] > 0
        assert all(4.0 <= image["fab"] <= 8.0 for image in result["images"])
        assert result["routed"] is False
    # the deployment: clustered configurations routed by the statistic (``--routed``)
    assert saved["clusters"]["patches"] == 400 and sorted(saved["bit_vectors"]) == ["-1", "0",
                                                                                  "1"]
    out = setup["root"] / "cadyq_routed.json"
    assert main(["eval", "--weights", str(setup["weights"]), "--calibration", str(record),
                 "--dataset", str(setup["data"]), "--scale", "2", "--routed", "--json",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["routed"] is True
    for image in result["images"]:
        (d_img,) = [key for key, count in image["d_img"].items() if count]
        assert image["fab"] == pytest.approx(np.mean(saved["bit_vectors"][d_img]))


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "--weights", "nope.pt", "--dataset", ".", "--scale", "2"], "nope.pt"),
    (["calibrate", "--weights", "W", "--calib", "C", "--method", "adabn", "-o", "r.json"],
     "did you mean 'adabm'"),
])
def test_errors_are_one_line_with_exit_2(setup: dict[str, Path], args: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(setup["weights"]) if a == "W" else str(setup["data"]) if a == "C" else a
            for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_quickstart_runs_the_default_job(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    assert main(["quickstart", "--out", str(tmp_path), "--bundle", str(bundle),
                 "--steps", "10"]) == 0
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert (tmp_path / "chelsea_x2_adaptive.png").exists()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["calibration"]["abits"] == 6 and manifest["model"]["scale"] == 2
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.strip().startswith(("bicubic ", "adaptive (quality)"))}
    psnr = {"bicubic": float(rows["bicubic"][1]), "adaptive": float(rows["adaptive"][2])}
    assert psnr["adaptive"] > psnr["bicubic"] + 0.5, out
    # the default bundle carries the rung ladder and the default policy allocates over it
    rungs = [rung["name"] for rung in manifest["rungs"]["rungs"]]
    assert rungs[0] == "bicubic" and rungs[-1] == "fp32" and "int8-all" in rungs, rungs
    line = next(line for line in out.splitlines() if "tiles per rung" in line)
    counts = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(";")[0].split(", "))
    assert list(counts) == rungs and sum(map(int, counts.values())) == int(
        line.split("(")[1].split()[0]), line


def test_build_clips_bounds_at_every_width_and_calibrate_by_default_only_at_4_bits() -> None:
    """`adasr build` calibrates for engines that run the bounds widened to 8 bits (BaC on);
    `adasr calibrate` keeps the simulated network's measured default (auto)."""
    import argparse

    from compiler.commands import build
    from compiler.commands import calibrate as calibrate_command

    parsers = {}
    for name, module in (("build", build), ("calibrate", calibrate_command)):
        parsers[name] = argparse.ArgumentParser()
        module.add_arguments(parsers[name])
    base = ["--weights", "w.pt", "-o", "out"]
    assert parsers["build"].parse_args(base).bac == "on"
    assert parsers["calibrate"].parse_args([*base, "--calib", "c"]).bac == "auto"
    assert parsers["calibrate"].parse_args([*base, "--calib", "c", "--bac", "off"]).bac == "off"


def test_calibration_images_are_downscaled_by_the_scale_unless_shipped_or_told() -> None:
    import argparse
    from types import SimpleNamespace

    from compiler.commands.calibrate import downscale_of
    from compiler.defaults import CALIBRATION_IMAGES

    loaded = SimpleNamespace(model=SimpleNamespace(scale=4))

    def of(calib: object, downscale: int | None) -> int:
        return downscale_of(argparse.Namespace(calib=calib, downscale=downscale), loaded)

    assert of(Path("photos"), None) == 4
    assert of(CALIBRATION_IMAGES, None) == 1 and of(None, None) == 1  # shipped LR crops
    assert of(Path("photos"), 1) == 1 and of(CALIBRATION_IMAGES, 2) == 2

"""Profiling the tiny bundle end to end: the JSON contract, quality numbers, saving, reports."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from profiles.plots import write_plots
from profiles.profiler import (
    ProfileOptions,
    _skip_reason,
    profile_bundle,
    results_path,
    save_profile,
)
from profiles.report import compare_table, markdown_report, terminal_report
from profiles.schema import Profile, profile_from_json, read_profile
from runtime.benchmark import load_benchmark
from runtime.manifest import read_manifest, write_manifest
from runtime.metrics import psnr_y
from runtime.policies import LatencyTable, load_latencies
from tests.conftest import require_module
from tests.profiles.conftest import ENGINES, SCALE, write_tiny_bundle

OPTIONS = ProfileOptions(batches=(1, 4), threads=(1,), runs=4, warmup=1, repeat=2, layer_runs=2,
                         frame_repeats=2, quick=True)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def profile(module_bundle: Path, benchmark_dir: Path) -> Profile:
    return profile_bundle(module_bundle, replace(OPTIONS, datasets=(benchmark_dir,)))


def _expected_psnr(benchmark_dir: Path, bias: float) -> list[float]:
    """Nearest-neighbour x2 plus ``bias`` (k/255), computed without the runtime's engines."""
    scores = []
    for image in load_benchmark(benchmark_dir, SCALE):
        up = image.lr.repeat(SCALE, axis=0).repeat(SCALE, axis=1).astype(np.int64)
        sr = np.clip(up + round(bias * 255), 0, 255).astype(np.uint8)
        scores.append(psnr_y(sr, image.hr, SCALE))
    return scores


def test_json_has_the_checkable_interface(profile: Profile) -> None:
    data = json.loads(json.dumps(profile.to_json()))
    assert data["schema"] == "adasr.profile/1"
    assert (data["target"], data["model"]) == ("cpu-x86", "tiny")
    assert {"machine", "processor", "cpus"} <= set(data["device"])
    assert {"python", "numpy", "onnxruntime", "bundle_adasr"} <= set(data["versions"])
    engines = data["engines"]
    # 3 engines x 2 batches x 1 thread count, cheapest first
    assert [(e["name"], e["batch"]) for e in engines] == [
        (n, b) for n in ENGINES for b in (1, 4)]
    for e in engines:
        lat = e["latency_ms"]
        assert isinstance(e["name"], str) and isinstance(e["psnr"], float)
        assert isinstance(e["fab"], float)
        assert 0 < lat["p10"] <= lat["median"] <= lat["p90"]
        assert lat["runs"] == OPTIONS.runs * OPTIONS.repeat
        assert len(e["repeat_medians_ms"]) == OPTIONS.repeat and e["spread"] >= 0
        assert (e["tile"], e["threads"], e["timer"]) == (16, 1, "wall-clock")
        mpix = e["batch"] * (16 * SCALE) ** 2 / 1e6
        assert e["throughput_mpix_s"] == pytest.approx(mpix / (lat["median"] / 1000))
        assert e["peak_rss_mb"] > 0 and e["bitops"] == 0.0  # no convs in the tiny engines
        assert e["layers"] and sum(x["share"] for x in e["layers"]) == pytest.approx(1.0)
    adaptive = data["adaptive"]
    assert adaptive["name"] == "adaptive" and adaptive["policy"] == "threshold"
    assert {"median", "p10", "p90"} <= set(adaptive["latency_ms"])
    assert adaptive["latency_ms"]["runs"] == 2 * OPTIONS.frame_repeats  # 2 images
    assert data["repeatability"]["max_spread"] == max(e["spread"] for e in engines)


def test_quality_per_engine_matches_nearest_neighbour_plus_bias(profile: Profile,
                                                               benchmark_dir: Path) -> None:
    for name, (_, fab, bias) in ENGINES.items():
        expected = _expected_psnr(benchmark_dir, bias)
        quality = profile.quality_of(name)
        assert quality is not None and quality.policy == f"fixed:{name}"
        assert [im.psnr for im in quality.images] == pytest.approx(expected, abs=1e-9)
        assert quality.psnr == pytest.approx(np.mean(expected), abs=1e-9)
        assert quality.fab == fab
        assert all(e.psnr == quality.psnr for e in profile.engines if e.name == name)
    psnrs = [q.psnr for q in profile.quality]
    assert psnrs == sorted(psnrs, reverse=True)  # bias 0 (a4) best, 2/255 (fp32) worst


def test_adaptive_routes_ramp_to_a4_and_noise_to_a6(profile: Profile) -> None:
    adaptive = profile.adaptive
    a4, a6 = profile.quality_of("a4"), profile.quality_of("a6")
    assert a4 is not None and a6 is not None
    by_image = {im.name: im.psnr for im in adaptive.images}
    # LR 20x28 noise: 2 x 2 tiles of 16 (overlap 4); LR 24x32 ramp: 2 x 3 tiles
    assert adaptive.histogram == {"a6": 4, "a4": 6}
    assert by_image["Synth/noise"] == pytest.approx(
        next(im.psnr for im in a6.images if im.name == "Synth/noise"), abs=1e-9)
    assert by_image["Synth/ramp"] == pytest.approx(
        next(im.psnr for im in a4.images if im.name == "Synth/ramp"), abs=1e-9)
    assert adaptive.fab == pytest.approx((6.0 + 4.0) / 2)  # one frame at FAB 6, one at 4
    assert adaptive.infer_ms is not None and adaptive.overhead_ms is not None
    assert 0 < adaptive.infer_ms + adaptive.overhead_ms <= adaptive.latency_ms.p90 * 1.01
    verdict = profile.pareto
    assert verdict.unit.startswith("ms per frame")
    assert verdict.adaptive_on_front == (verdict.dominated_by == ())
    assert "adaptive" in verdict.explanation


def test_json_round_trip_and_policy_reads_it(profile: Profile) -> None:
    data = json.loads(json.dumps(profile.to_json()))
    assert profile_from_json(data) == profile
    table = LatencyTable.from_profile(data, 16, threads=1)
    for name in ENGINES:
        entry = next(e for e in profile.engines if e.name == name and e.batch == 4)
        assert table.per_tile_ms[name] == pytest.approx(entry.latency_ms.median / 4)


def test_save_updates_the_bundle_atomically(profile: Profile, module_bundle: Path,
                                            tmp_path: Path) -> None:
    bundle = shutil.copytree(module_bundle, tmp_path / "bundle")
    path = save_profile(profile, bundle, results_dir=tmp_path / "results")
    assert path == results_path(profile, tmp_path / "results")
    assert path == tmp_path / "results" / "cpu-x86" / "tiny.json"
    assert read_profile(path) == profile
    manifest = read_manifest(bundle)
    assert manifest.profile == "profile.json"
    assert read_profile(bundle / "profile.json") == profile
    assert set(load_latencies(bundle, manifest).per_tile_ms) == set(ENGINES)
    assert not [p for p in bundle.rglob("*.tmp")]  # no temp files left behind


def test_reports_and_plots(profile: Profile, tmp_path: Path) -> None:
    plots = write_plots(profile, tmp_path)
    assert set(plots) == {"latency", "pareto", "layers"}
    for path in plots.values():
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    report = markdown_report(profile, {k: p.name for k, p in plots.items()})
    for name in ENGINES:
        assert f"| {name} | 16 | 1 | 1 |" in report and f"### {name} (tile 16" in report
    assert "| adaptive |" in report
    assert "![pareto](pareto.png)" in report and "![latency](latency.png)" in report
    text = terminal_report(profile)
    assert all(name in text for name in ENGINES) and "Pareto:" in text and "noise:" in text


def test_compare_shows_ratios(profile: Profile) -> None:
    slower = replace(profile, engines=tuple(
        replace(e, latency_ms=replace(e.latency_ms, median=e.latency_ms.median * 2))
        for e in profile.engines if e.name != "fp32"))
    table = compare_table(profile, slower)
    lines = [line for line in table.splitlines() if line.startswith(("a4 ", "a6 "))]
    assert len(lines) == 2 * 2 + 2  # 2 engines x 2 batches, plus their per-frame rows
    assert sum("2.00x" in line for line in lines) == 4
    assert "only in A: fp32" in table


def test_static_shapes_skip_what_the_engines_cannot_run(benchmark_dir: Path,
                                                         tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "static")
    manifest = read_manifest(bundle)
    static = tuple(replace(spec, input_shape=(1, 3, 16, 16)) for spec in manifest.engines)
    write_manifest(bundle, replace(manifest, engines=static))
    options = replace(OPTIONS, tiles=(16, 24), batches=(1, 2), layer_runs=0, frame_repeats=1,
                      datasets=(benchmark_dir,))
    result = profile_bundle(bundle, options)
    assert {(e.tile, e.batch) for e in result.engines} == {(16, 1)}
    assert all(e.layers == () for e in result.engines)  # layer_runs=0: no per-layer profile
    assert result.settings.frame_batch == 1  # the dispatcher runs the engines' static batch
    assert "engine 'a4' is built for 16 x 16 tiles: tile 24 not measured" in result.notes
    assert "engine 'a4' is built for batch 1: batch 2 not measured" in result.notes
    trt = replace(static[0], backend="tensorrt", input_shape=(8, 3, 16, 16))
    assert _skip_reason(trt, 16, 1) is None  # TensorRT pads a partial batch
    assert _skip_reason(trt, 24, 8) is not None


def test_other_backends_are_measured_side_by_side(module_bundle: Path,
                                                  benchmark_dir: Path) -> None:
    """``--backends onnxruntime,openvino``: every engine's entry right after the bundle's own,
    named NAME@openvino, with its own quality (the same graphs: the same numbers here)."""
    require_module("openvino")
    got = profile_bundle(module_bundle, replace(OPTIONS, datasets=(benchmark_dir,), batches=(1,),
                                                layer_runs=0,
                                                backends=("onnxruntime", "openvino")))
    order = [q.name for q in got.quality if "@" not in q.name]
    assert [e.name for e in got.engines] == [n for name in order
                                             for n in (name, f"{name}@openvino")]
    for name, (_, _, bias) in ENGINES.items():
        quality = got.quality_of(f"{name}@openvino")
        assert quality is not None and quality.policy == f"fixed:{name}"
        assert quality.psnr == pytest.approx(np.mean(_expected_psnr(benchmark_dir, bias)),
                                             abs=1e-9)
    latencies = LatencyTable.from_profile(got.to_json(), got.engines[0].tile)
    assert set(latencies.per_tile_ms) == {e.name for e in got.engines}
    with pytest.raises(Exception, match="unknown backend 'openvno'"):
        replace(OPTIONS, backends=("openvno",))

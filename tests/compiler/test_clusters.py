"""Deploying Granular-DQ and CADyQ (issue 19, item 4): CADyQ's selector bits clustered into at
most three engines routed by the complexity statistic, Granular-DQ's bit classes as engines, both
through the plan / lower / bundle path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from compiler.bundle import write_bundle
from compiler.lower.qdq import lowering_summary
from compiler.parity import simulate_engine
from compiler.plan import describe_plan, plan_engines
from compiler.quant.clusters import cluster, fit_router, kmeans, nearest
from compiler.quant.qmodel import QuantSettings
from compiler.quant.record import apply_record, read_record, record_from_json, record_of
from compiler.simulate import TorchUpscaler
from compiler.zoo import load_model
from runtime.bundle import open_bundle
from runtime.dispatch import Dispatcher
from runtime.errors import CalibrationError, ConfigError
from runtime.imaging import to_uint8
from runtime.metrics import psnr
from runtime.statistic import complexity_batch
from targets.loader import load_target
from tests.conftest import calibrate_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TILE, OVERLAP = 16, 4


@pytest.fixture(scope="module")
def records(tiny: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    """Tiny EDSR records: CADyQ W8A6 (clustered by ``calibrate``), Granular-DQ W8A6."""
    return calibrate_tiny(tiny, {"cadyq": QuantSettings(method="cadyq", wbits=8, abits=6),
                                 "granular": QuantSettings(method="granular", wbits=8, abits=6)})


@pytest.fixture(scope="module")
def bundles(tiny: tuple[Path, Path], records: dict[str, dict[str, Any]],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The emulate-ladder cpu-x86 bundle of each record."""
    root = tmp_path_factory.mktemp("dynamic")
    out = {}
    for name, record in records.items():
        plan = plan_engines(record, load_target("cpu-x86"), "emulate", tile=TILE, overlap=OVERLAP)
        out[name] = root / name
        write_bundle(load_model(tiny[0]), record, plan, out[name])
    return out


def _images() -> list[np.ndarray]:
    """uint8 LR images mixing flat, smooth and noisy regions (every class gets tiles)."""
    rng = np.random.default_rng(3)
    smooth = np.kron(rng.random((6, 8, 3)), np.ones((8, 8, 1)))
    smooth[:, 32:] += 0.5 * rng.random((48, 32, 3))
    smooth[:16, :16] = 0.5
    return [np.round(np.clip(smooth, 0, 1) * 255).astype(np.uint8)]


def test_kmeans_recovers_planted_configurations_deterministically() -> None:
    rng = np.random.default_rng(0)
    planted = np.array([[4, 4, 6], [6, 6, 6], [8, 6, 8]], dtype=np.float64)
    labels = rng.integers(0, 3, 60)
    bits = planted[labels].copy()
    flips = rng.random(bits.shape) < 0.1  # a few layers of a few patches off their centre
    bits[flips] = rng.choice([4.0, 6.0, 8.0], int(flips.sum()))
    configs = kmeans(bits, 3, (4, 6, 8))
    assert configs.tolist() == planted.tolist()
    assert kmeans(bits[rng.permutation(60)], 3, (4, 6, 8)).tolist() == planted.tolist()
    # complexity rises with the nearest configuration: the router separates them exactly
    truth = nearest(bits, planted)
    g = truth * 10.0 + rng.random(60)
    (low, high), agreement = fit_router(g, truth, (0, 1, 2))
    assert agreement == 1.0
    assert g[truth == 0].max() < low < g[truth == 1].min()
    assert g[truth == 1].max() < high < g[truth == 2].min()
    first, second = cluster(bits, g, (4, 6, 8)), cluster(bits, g, (4, 6, 8))
    assert first == second
    assert first.vectors == ((4, 4, 6), (6, 6, 6), (8, 6, 8)) and first.count == 3
    assert first.shares == tuple(float(np.mean(truth == c)) for c in range(3))
    # the flips leave the selectors' mean bits under the planted configurations' (6.011 vs
    # 6.022), so holding them costs the router one patch
    assert float(bits.mean()) < float(planted[truth].mean())
    assert first.agreement == 59 / 60


def test_fewer_distinct_configurations_repeat_the_highest() -> None:
    bits = np.array([[4.0, 4.0]] * 5 + [[8.0, 8.0]] * 5)
    result = cluster(bits, np.arange(10.0), (4, 6, 8), count=3)
    assert result.count == 2
    assert result.vectors == ((4, 4), (8, 8), (8, 8))
    assert result.shares == (0.5, 0.5, 0.0) and result.agreement == 1.0
    assert cluster(bits, np.arange(10.0), (4, 6, 8), count=1).vectors == ((6, 6),) * 3  # the mean
    with pytest.raises(ConfigError, match="clusters must be 1..3"):
        kmeans(bits, 4, (4, 6, 8))


def test_router_cuts_are_the_exact_optimum() -> None:
    """Against a brute-force search over every pair of thresholds between the sorted values."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        g = np.round(rng.random(30) * 20)  # ties included
        target = rng.integers(0, 3, 30)
        (low, high), agreement = fit_router(g, target, (0, 1, 2))
        routed = (g > high).astype(int) - (g < low).astype(int) + 1
        assert np.mean(routed == target) == agreement
        edges = np.concatenate([[g.min() - 1], np.unique(g) + 0.5])
        best = max(np.mean((g > b).astype(int) - (g < a).astype(int) + 1 == target)
                   for a in edges for b in edges if a <= b)
        assert agreement == best


def test_router_holds_the_selectors_mean_bits() -> None:
    """With ``max_fab`` the router keeps the best agreement among the cuts whose routed mean
    bits stay under it; ``cluster`` holds the routed network to the selectors' own mean bits."""
    g = np.arange(10.0)
    target = np.array([0] * 2 + [1] * 4 + [2] * 4)
    free, agreement = fit_router(g, target, (0, 1, 2))
    assert agreement == 1.0 and free == (1.5, 5.5)  # mean bits (2*4 + 4*6 + 4*8) / 10 = 6.4
    (low, high), held = fit_router(g, target, (0, 1, 2), (4.0, 6.0, 8.0), max_fab=6.0)
    routed = (g > high).astype(int) - (g < low).astype(int) + 1
    fab = float(np.mean(np.array([4.0, 6.0, 8.0])[routed]))
    assert fab <= 6.0 and held == float(np.mean(routed == target)) == 0.8
    # nothing reaches 3 bits: the lowest mean there is, all patches on class -1
    (low, high), _ = fit_router(g, target, (0, 1, 2), (4.0, 6.0, 8.0), max_fab=3.0)
    assert low > g.max() and high >= low
    # the selectors: 4 / 6 / 8 everywhere on 2 / 4 / 4 patches, but one 8-bit patch is busy in
    # one layer only, so the snapped configurations sit above their members' mean bits
    bits = np.array([[4.0, 4.0]] * 2 + [[6.0, 6.0]] * 4 + [[8.0, 8.0]] * 3 + [[8.0, 4.0]])
    result = cluster(bits, g, (4, 6, 8))
    lower, upper = result.thresholds
    classes = (g > upper).astype(int) - (g < lower).astype(int) + 1
    config_bits = [float(np.mean(v)) for v in result.vectors]
    assert np.mean([config_bits[c] for c in classes]) <= float(bits.mean()) + 1e-9


def test_a_clustered_record_round_trips(tmp_path: Path, tiny: tuple[Path, Path],
                                        records: dict[str, dict[str, Any]]) -> None:
    record = records["cadyq"]
    clusters = record["clusters"]
    assert clusters["patches"] == 400 and 1 <= clusters["count"] <= 3
    assert 0 < clusters["agreement"] <= 1 and abs(sum(clusters["shares"]) - 1) < 1e-9
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    rec = read_record(path)
    assert rec.deployable and rec.clusters is not None
    assert rec.clusters.count == clusters["count"] and rec.clusters.shares == tuple(
        clusters["shares"])
    assert all(set(bits) <= {4, 6, 8} for bits in rec.bit_vectors.values())
    # record -> network -> record: the deployment travels with the selector network
    data = json.loads(json.dumps(record_of(apply_record(load_model(tiny[0]), rec),
                                           load_model(tiny[0]), record["calibration"])))
    for key in ("bit_vectors", "clusters", "image_thresholds", "layers"):
        assert data[key] == json.loads(json.dumps(record[key])), key


def test_older_records_read_and_an_unclustered_cadyq_record_is_not_deployed(
        tiny: tuple[Path, Path], records: dict[str, dict[str, Any]]) -> None:
    old = copy.deepcopy(records["cadyq"])  # a CADyQ record written before the clusters
    del old["clusters"]
    old["bit_vectors"] = {"-1": [4] * 4, "0": [6] * 4, "1": [8] * 4}
    rec = record_from_json(old)
    assert rec.clusters is None and not rec.deployable
    apply_record(load_model(tiny[0]), rec)  # the selector network still simulates
    with pytest.raises(CalibrationError, match="no clustered configurations"):
        apply_record(load_model(tiny[0]), rec, routed=True)
    with pytest.raises(ConfigError, match="holds no clustered configurations"):
        plan_engines(old, load_target("cpu-x86"), "emulate")
    v1 = {**copy.deepcopy(records["granular"]), "schema": "adasr.calibration/1"}
    v1["settings"] = {**v1["settings"], "method": "adabm"}
    del v1["settings"]["image_step"]
    assert record_from_json(v1).settings.image_step == 1  # migrated
    with pytest.raises(CalibrationError, match="method 'granular' is not a"):
        record_from_json({**v1, "settings": {**v1["settings"], "method": "granular"}})


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["bit_vectors"].__setitem__("0", [5, 6, 6, 6]),
     "bit_vectors.0: expected bits out of the selectors' candidates"),
    (lambda r: r["clusters"].__setitem__("count", 4), "clusters.count: expected an integer in"),
    (lambda r: r["clusters"].__setitem__("agreement", 1.5), "clusters.agreement"),
])
def test_a_bad_clusters_field_is_one_line(records: dict[str, dict[str, Any]], edit: Any,
                                          message: str) -> None:
    data = copy.deepcopy(records["cadyq"])
    edit(data)
    with pytest.raises(CalibrationError, match=f"^calibration record field {message}"):
        record_from_json(data)


def test_clusters_on_a_method_without_selectors_are_refused(
        records: dict[str, dict[str, Any]]) -> None:
    data = {**copy.deepcopy(records["granular"]), "clusters": records["cadyq"]["clusters"]}
    with pytest.raises(CalibrationError, match="clusters: expected null .method granular"):
        record_from_json(data)


@pytest.mark.parametrize("method", ["cadyq", "granular"])
def test_bundle_engines_equal_the_routed_simulation(
        tiny: tuple[Path, Path], records: dict[str, dict[str, Any]],
        bundles: dict[str, Path], method: str) -> None:
    """Every engine matches its simulation bit for bit, the dispatcher routes each tile to the
    class the routed simulation gives it, and the dispatched bundle equals the routed network."""
    weights, record = tiny[0], records[method]
    bundle = open_bundle(bundles[method])
    manifest = bundle.manifest
    assert manifest.calibration.method == method
    rec = record_from_json(record)
    image = _images()[0]
    for spec in manifest.engines:
        if spec.reference:
            continue
        assert [layer.act_bits for layer in spec.layers[:4]] == list(
            rec.bit_vectors[spec.offsets[0]])
        summary = lowering_summary(onnx.load(bundles[method] / spec.onnx.path))
        sim = TorchUpscaler(simulate_engine(weights, record, spec, summary=summary), 2)
        with bundle.engine(spec.name, threads=1) as engine:
            x = (image.transpose(2, 0, 1)[None] / 255).astype(np.float32)
            assert np.array_equal(to_uint8(engine.infer(x)[0].transpose(1, 2, 0)),
                                  to_uint8(sim(image)))
    routed = apply_record(load_model(weights), record, routed=method == "cadyq")
    upscaler = TorchUpscaler(routed, 2, tile=TILE, overlap=OVERLAP)
    expected = to_uint8(upscaler(image))
    with Dispatcher(manifest, bundle.engines(threads=1)) as dispatcher:
        result = dispatcher.upscale(image)
    classes = upscaler.bits[0].d_img
    assert {str(d): result.offsets.count(d) for d in (-1, 0, 1)} == classes
    assert sum(v > 0 for v in classes.values()) >= 2  # more than one engine ran
    assert psnr(result.sr, expected, 255.0) >= 50.0
    tiles = image[None]  # the whole image's statistic: the same rule on both sides
    g = float(complexity_batch(tiles)[0])
    assert rec.image_thresholds[0] <= rec.image_thresholds[1] and g >= 0


def test_hardware_plans_say_which_configurations_share_a_kernel(
        records: dict[str, dict[str, Any]]) -> None:
    for method, record in records.items():
        plan = plan_engines(record, load_target("cpu-x86"), "hardware", floats="none")
        configurations = len({tuple(v) for v in record["bit_vectors"].values()})
        assert plan.collapse == (f"image classes -1/0/+1: {configurations} bit configuration(s) "
                                 "on 1 kernel configuration(s) (int8 x4) -> 1 engine(s)"), method
        assert plan.collapse in describe_plan(plan)
        emulate = plan_engines(record, load_target("cpu-x86"), "emulate")
        assert len([e for e in emulate.engines if e.offsets]) == configurations

"""Regression corpus (issue 14, part B): a hand-edited calibration record gets one line naming the
field, at every door (``read_record``, ``apply_record``, ``adasr build --calibration``,
``adasr eval --calibration``, the bundle writer), and never goes into a bundle."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from compiler.cli import main
from compiler.quant.qmodel import QuantSettings
from compiler.quant.record import apply_record, read_record, record_from_json
from compiler.zoo import load_model
from runtime.errors import CalibrationError
from tests.conftest import calibrate_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Edit = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def records(tiny: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    """Real records of the tiny EDSR: AdaBM W8A6 FQ, DDTB W4A4 (with gates), CADyQ W8A6 FQ (with
    selectors)."""
    return calibrate_tiny(tiny, {"adabm": QuantSettings(method="adabm", wbits=8, abits=6, fq=True),
                                 "ddtb": QuantSettings(method="ddtb", wbits=4, abits=4),
                                 "cadyq": QuantSettings(method="cadyq", wbits=8, abits=6,
                                                        fq=True)})


def edited(record: dict[str, Any], edit: Edit) -> dict[str, Any]:
    data = json.loads(json.dumps(record))  # what a file round trip gives
    edit(data)
    return data


def write(folder: Path, data: object) -> Path:
    path = folder / "r.json"
    path.write_text(json.dumps(data))
    return path


def field(message: str) -> str:
    return f"calibration record r.json field {message}"


def set_layer(index: int, key: str, value: object) -> Edit:
    return lambda r: r["layers"][index].__setitem__(key, value)


CASES: list[tuple[str, Edit, str]] = [
    ("missing key", lambda r: r["layers"][0].pop("a_bounds"), field("layers[0].a_bounds: missing")),
    ("missing settings", lambda r: r.pop("settings"), field("settings: missing")),
    ("reversed bounds", set_layer(1, "a_bounds", [5.0, 1.0]),
     field("layers[1].a_bounds: expected two finite numbers, lower <= upper, got [5.0, 1.0]")),
    ("reversed thresholds", lambda r: r.__setitem__("image_thresholds", [50.0, 10.0]),
     field("image_thresholds: expected two finite numbers, lower <= upper, got [50.0, 10.0]")),
    ("string bits", lambda r: r["settings"].__setitem__("abits", "6"),
     field("settings.abits: expected an integer in 2..8, got '6'")),
    ("string layer bits", set_layer(0, "w_bits", "8"),
     field("layers[0].w_bits: expected an integer in 2..8, got '8'")),
    ("W99A99", lambda r: r["settings"].update(wbits=99, abits=99),
     field("settings.wbits: expected an integer in 2..8, got 99")),
    ("A99", lambda r: r["settings"].update(abits=99),
     field("settings.abits: expected an integer in 2..8, got 99")),
    ("method foo", lambda r: r["settings"].__setitem__("method", "foo"),
     field("settings.method: unknown method 'foo'; allowed: adabm, cadyq, ddtb, granular, "
           "minmax, percentile")),
    ("method typo", lambda r: r["settings"].__setitem__("method", "adabn"),
     field("settings.method: unknown method 'adabn' (did you mean 'adabm'?); allowed: adabm, "
           "cadyq, ddtb, granular, minmax, percentile")),
    ("NaN bound", set_layer(2, "a_bounds", [float("nan"), 1.0]),
     field("layers[2].a_bounds[0]: expected a finite number, got nan")),
    ("infinite clip", set_layer(0, "w_clip", float("inf")),
     field("layers[0].w_clip: expected a finite number in 0..inf, got inf")),
    ("negative clip", set_layer(0, "w_clip", -1.0),
     field("layers[0].w_clip: expected a finite number in 0..inf, got -1.0")),
    ("layer offset 5", set_layer(0, "layer_offset", 5),
     field("layers[0].layer_offset: expected an integer in -1..1, got 5")),
    ("unknown kind", set_layer(0, "kind", "dynamic"),
     field("layers[0].kind: unknown kind 'dynamic'; allowed: adaptive, fixed")),
    ("bit vector 99", lambda r: r["bit_vectors"]["0"].__setitem__(0, 99),
     field("bit_vectors.0[0]: expected an integer in 0..10, got 99")),
    ("short bit vector", lambda r: r["bit_vectors"]["1"].pop(),
     field("bit_vectors.1: expected a list of 4..4 items, got [7.0, 6.0, 7.0]")),
    ("missing offset", lambda r: r["bit_vectors"].pop("-1"),
     field("bit_vectors: expected one bit vector per image offset -1, 0, 1 (adabm), got an "
           "object")),
    ("duplicate layer", lambda r: r["layers"].__setitem__(1, copy.deepcopy(r["layers"][0])),
     field("layers: expected layers with distinct names, got a list of 8")),
    ("null layers", lambda r: r.__setitem__("layers", None),
     field("layers: expected a list, got null")),
    ("null layer", lambda r: r["layers"].__setitem__(3, None),
     field("layers[3]: expected an object, got null")),
    ("bad checkpoint hash", lambda r: r["checkpoint"].__setitem__("sha256", "xyz"),
     field("checkpoint.sha256: expected a sha256 (64 lowercase hex digits), got 'xyz'")),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_record_field_is_one_line_naming_it(
        tmp_path: Path, records: dict[str, dict[str, Any]], edit: Edit, message: str) -> None:
    path = write(tmp_path, edited(records["adabm"], edit))
    with pytest.raises(CalibrationError) as err:
        read_record(path)
    assert str(err.value) == message


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["layers"][2]["gate"].pop("norm_mean"),
     field("layers[2].gate.norm_mean: missing")),
    (lambda r: r["layers"][2]["gate"].__setitem__("reduce_weight", [[1.0, 2.0], [3.0]]),
     field("layers[2].gate.reduce_weight: expected a number or a rectangular list of numbers, "
           "got a list of 2")),
    (lambda r: r["layers"][2]["gate"].__setitem__("reduce_bias", ["a"]),
     field("layers[2].gate.reduce_bias: expected a number or a rectangular list of numbers, "
           "got a list of 1")),
    (lambda r: r["bit_vectors"].__setitem__("1", [4, 4, 4, 4]),
     field("bit_vectors: expected one bit vector per image offset 0 (ddtb), got an object")),
], ids=["missing gate tensor", "ragged gate tensor", "string in a gate tensor",
        "offsets of a non-adaptive record"])
def test_a_bad_ddtb_record_field_is_one_line_naming_it(
        tmp_path: Path, records: dict[str, dict[str, Any]], edit: Edit, message: str) -> None:
    assert records["ddtb"]["layers"][2]["gate"] is not None
    path = write(tmp_path, edited(records["ddtb"], edit))
    with pytest.raises(CalibrationError) as err:
        read_record(path)
    assert str(err.value) == message


def _selector(index: int, key: str, value: object) -> Edit:
    return lambda r: r["layers"][index]["selector"].__setitem__(key, value)


@pytest.mark.parametrize(("record", "edit", "message"), [
    ("cadyq", _selector(2, "bias", [0.0, 1.0]),
     field("layers[2].selector.bias: expected numbers of shape [3], got [0.0, 1.0]")),
    ("cadyq", _selector(2, "weight", [[0.0] * 9] * 3),
     field("layers[2].selector.weight: expected numbers of shape [3, 10], got a list of 3")),
    ("cadyq", _selector(2, "scale", [1.0] * 9 + [0.0]),
     field("layers[2].selector.scale: expected positive numbers, got [1.0, 1.0, 1.0, 1.0, 1.0, "
           "1.0, 1.0, 1.0, 1.0, 0.0]")),
    ("cadyq", _selector(2, "candidates", [4, 6, 10]),
     field("layers[2].selector.candidates: expected [4, 6, 8] for --abits 6, got [4, 6, 10]")),
    ("cadyq", _selector(2, "candidates", [6, 4, 8]),
     field("layers[2].selector.candidates: expected three increasing bit-widths, got [6, 4, 8]")),
    ("cadyq", set_layer(2, "selector", None),
     field("layers[2]: expected a selector (method cadyq, adaptive layer), got an object")),
    ("cadyq", lambda r: r["layers"][5].__setitem__("selector", r["layers"][2]["selector"]),
     field("layers[5].selector: expected null (method cadyq, fixed layer), got an object")),
    ("adabm", lambda r: r["layers"][2].__setitem__("selector", {}),
     field("layers[2].selector.candidates: missing")),
], ids=["short bias", "narrow weight", "zero scale", "candidates off the base",
        "unordered candidates", "adaptive layer without selector", "fixed layer with one",
        "adabm layer with one"])
def test_a_bad_selector_is_one_line_naming_it(tmp_path: Path, records: dict[str, dict[str, Any]],
                                              record: str, edit: Edit, message: str) -> None:
    path = write(tmp_path, edited(records[record], edit))
    with pytest.raises(CalibrationError) as err:
        read_record(path)
    assert str(err.value) == message


def test_a_cadyq_record_round_trips(tmp_path: Path, tiny: tuple[Path, Path],
                                    records: dict[str, dict[str, Any]]) -> None:
    """Written and read back, the record's selectors are the calibrated ones, and the rebuilt
    network makes the same per-layer choices (record -> file -> record gives the same data)."""
    record = records["cadyq"]
    rec = read_record(write(tmp_path, record))
    assert rec.settings.method == "cadyq" and rec.settings.image_step == 2
    assert [layer.selector is not None for layer in rec.layers] == [
        layer["kind"] == "adaptive" for layer in record["layers"]]
    first = next(layer for layer in rec.layers if layer.selector is not None)
    assert first.selector is not None and first.selector.candidates == (4, 6, 8)
    assert first.selector.weight.shape == (3, 8 + 2)
    data = record_of_json(apply_record(load_model(tiny[0]), rec), tiny[0], record)
    assert data["layers"] == json.loads(json.dumps(record["layers"]))
    assert data["bit_vectors"] == json.loads(json.dumps(record["bit_vectors"]))


def record_of_json(qnet: Any, weights: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``record_of`` of a rebuilt network, as a file round trip gives it."""
    from compiler.quant.record import record_of

    return json.loads(json.dumps(record_of(qnet, load_model(weights), record["calibration"])))


def test_a_gate_of_the_wrong_shape_is_one_line(tiny: tuple[Path, Path],
                                               records: dict[str, dict[str, Any]]) -> None:
    data = edited(records["ddtb"],
                  lambda r: r["layers"][2]["gate"].__setitem__("reduce_bias", [1.0] * 99))
    with pytest.raises(CalibrationError, match=r"^record layer 'body.1.body.0' does not fit the "
                                               r"network: .*size mismatch"):
        apply_record(load_model(tiny[0]), data)


def test_valid_records_read_typed_and_rebuild_the_network(
        tmp_path: Path, tiny: tuple[Path, Path], records: dict[str, dict[str, Any]]) -> None:
    for name, record in records.items():
        rec = read_record(write(tmp_path, record))
        settings = dict(record["settings"])
        assert settings.pop("image_step") == rec.settings.image_step
        assert rec.settings == QuantSettings(**settings)
        assert rec.bit_vectors == {int(k): tuple(int(b) for b in v)
                                   for k, v in record["bit_vectors"].items()}
        assert [layer.name for layer in rec.layers] == [x["name"] for x in record["layers"]]
        assert rec.image_thresholds == tuple(record["image_thresholds"]), name
        apply_record(load_model(tiny[0]), rec)


@pytest.mark.parametrize("data", [None, 3, "x", [], {"schema": "adasr.calibration/0"}])
def test_not_a_record_at_all(data: object) -> None:
    with pytest.raises(CalibrationError, match="unsupported record schema"):
        record_from_json(data)


def test_apply_record_refuses_a_bad_dict_in_one_line(tiny: tuple[Path, Path],
                                                     records: dict[str, dict[str, Any]]) -> None:
    data = edited(records["adabm"], lambda r: r["layers"][0].pop("w_clip"))
    with pytest.raises(CalibrationError) as err:
        apply_record(load_model(tiny[0]), data)
    assert str(err.value) == "calibration record field layers[0].w_clip: missing"


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in CASES
                                               if c[0] in ("W99A99", "method foo",
                                                           "reversed bounds", "missing key")],
                         ids=["W99A99", "method foo", "reversed bounds", "missing key"])
def test_build_refuses_the_record_before_building_anything(
        tmp_path: Path, tiny: tuple[Path, Path], records: dict[str, dict[str, Any]],
        capsys: pytest.CaptureFixture[str], edit: Edit, message: str) -> None:
    weights, calib = tiny
    path = write(tmp_path, edited(records["adabm"], edit))
    out = tmp_path / "bundle"
    assert main(["build", "--weights", str(weights), "--calibration", str(path), "--calib",
                 str(calib), "--target", "cpu-x86", "--tile", "16", "--overlap", "4",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"adasr build: error: {message}"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_eval_refuses_the_record_in_one_line(
        tmp_path: Path, tiny: tuple[Path, Path], records: dict[str, dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, edited(records["adabm"], lambda r: r["layers"][0].pop("a_bounds")))
    assert main(["eval", "--weights", str(tiny[0]), "--calibration", str(path), "--dataset",
                 str(tmp_path / "none"), "--scale", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "adasr eval: error: " + field("layers[0].a_bounds: missing")


def test_the_bundle_writer_refuses_an_invalid_record(
        tmp_path: Path, tiny: tuple[Path, Path], records: dict[str, dict[str, Any]]) -> None:
    from compiler.bundle import write_bundle
    from compiler.plan import plan_engines
    from targets.loader import load_target

    record = records["adabm"]
    plan = plan_engines(record, load_target("cpu-x86"), "hardware", tile=16, overlap=4)
    bad = edited(record, lambda r: r["settings"].update(wbits=99))
    with pytest.raises(CalibrationError) as err:
        write_bundle(load_model(tiny[0]), bad, plan, tmp_path / "bundle")
    assert str(err.value) == ("calibration record field settings.wbits: expected an integer in "
                              "2..8, got 99")
    assert list(tmp_path.iterdir()) == []


def _as_v1(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as the version 1 writer wrote it: no settings.image_step."""
    data = edited(record, lambda r: r["settings"].pop("image_step"))
    data["schema"] = "adasr.calibration/1"
    return data


@pytest.mark.parametrize("name", ["adabm", "ddtb"])
def test_version_1_records_are_migrated(records: dict[str, dict[str, Any]], tiny: tuple[Path, Path],
                                        name: str) -> None:
    """A record of the previous schema reads as the current one (image step 1) and rebuilds the
    same network; the migration does not touch its input."""
    current = records[name]
    assert current["schema"] == "adasr.calibration/2"
    old = _as_v1(current)
    kept = copy.deepcopy(old)
    migrated = record_from_json(old)
    assert old == kept
    assert migrated.data["schema"] == "adasr.calibration/2"
    assert migrated.data["settings"]["image_step"] == 1
    assert dict(migrated.data) == json.loads(json.dumps(current))
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(apply_record(load_model(tiny[0]), old)(x),
                           apply_record(load_model(tiny[0]), current)(x))


def test_version_1_has_no_granular_and_steps_match_the_method(
        records: dict[str, dict[str, Any]]) -> None:
    old = _as_v1(records["adabm"])
    old["settings"]["method"] = "granular"
    with pytest.raises(CalibrationError, match="method 'granular' is not a 'adasr.calibration/1'"):
        record_from_json(old)
    wrong = edited(records["adabm"], lambda r: r["settings"].__setitem__("image_step", 2))
    with pytest.raises(CalibrationError, match=r"settings.image_step: expected 1 for method adabm"):
        record_from_json(wrong)

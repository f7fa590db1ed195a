"""Regression corpus (issue 14, part B): a bundle cannot reach outside itself, and a hand-edited
manifest gets one line naming the field.

Every case tampers a real on-disk bundle (``tests/runtime/conftest.py``) the way a hostile but
ordinary user would, then checks the exact message and that nothing outside the bundle was opened
(every ``open`` and ONNX Runtime session is recorded) or written.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from compiler.cli import main
from runtime.bundle import open_bundle
from runtime.bundlepaths import (
    ENGINE_NAME_RULE,
    RELPATH_RULE,
    TARGET_NAME_RULE,
    bundle_path,
    engine_name_problem,
    external_data_tensors,
    relpath_problem,
)
from runtime.errors import BundleError
from runtime.fields import describe
from runtime.fileio import atomic_write_bytes, sha256_file
from runtime.manifest import read_manifest
from runtime.policies import load_latencies
from tests.runtime.conftest import make_manifest, nearest_onnx, write_tiny_bundle

Edit = Callable[[dict[str, Any]], None]


def tamper(bundle: Path, edit: Edit) -> None:
    """Edit ``manifest.json`` as JSON, the way a user with a text editor would."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


def file_entry(path: Path, name: str) -> dict[str, Any]:
    """A manifest file entry naming ``name`` with the real sha256 and size of ``path``."""
    return {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links not followed) with its content: what is on disk."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            out[str(path.relative_to(root))] = b"->" + os.readlink(path).encode() if \
                path.is_symlink() else path.read_bytes()
    return out


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path opened from Python (``open``, ``io.open``, hence pathlib) or by an ONNX Runtime
    session while the test runs, resolved."""
    import onnxruntime

    seen: list[Path] = []
    real_open, real_session = io.open, onnxruntime.InferenceSession

    def recording_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike):
            seen.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    def recording_session(model: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(model, str | os.PathLike):
            seen.append(Path(model).resolve())
        return real_session(model, *args, **kwargs)

    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    return seen


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the bundle holding a valid engine, record and profile: what a tampered
    manifest points at."""
    folder = tmp_path / "outside"
    atomic_write_bytes(folder / "secret.onnx", nearest_onnx(2, 0.5))
    atomic_write_bytes(folder / "calibration.json", b'{"schema": "adasr.calibration/1"}\n')
    atomic_write_bytes(folder / "profile.json", json.dumps(PROFILE).encode())
    return folder


PROFILE = {"schema": "adasr.profile/1", "engines": [
    {"name": name, "tile": 16, "batch": 1, "threads": 1, "latency_ms": {"median": 1.0}}
    for name in ("a4", "a6", "fp32")]}


def assert_not_read(opened: list[Path], folder: Path) -> None:
    inside = [p for p in opened if p.is_relative_to(folder.resolve())]
    assert inside == [], f"read outside the bundle: {inside}"


def one_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"adasr {command}: error: ") and "\n" not in err, err
    assert "sha256 ok" not in captured.out
    return err.removeprefix(f"adasr {command}: error: ")


def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- paths out of the bundle

FIELDS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    # what -> (the field's name in messages, the manifest object that holds the file entry)
    "engine": ("engines[0].onnx", lambda m: m["engines"][0]),
    "calibration": ("calibration.file", lambda m: m["calibration"]),
}


def _escape(trick: str, target: Path) -> str:
    return str(target) if trick == "absolute" else f"../outside/{target.name}"


@pytest.mark.parametrize("trick", ["absolute", "dotdot"])
@pytest.mark.parametrize("what", ["engine", "calibration"])
def test_a_file_path_leading_out_of_the_bundle_is_refused_by_the_reader(
        tmp_path: Path, outside: Path, opened: list[Path], capsys: pytest.CaptureFixture[str],
        what: str, trick: str) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    field, holder = FIELDS[what]
    target = outside / ("secret.onnx" if what == "engine" else "calibration.json")
    path = _escape(trick, target)
    key = "onnx" if what == "engine" else "file"
    tamper(bundle, lambda m: holder(m).__setitem__(key, file_entry(target, path)))
    before = tree(tmp_path)
    opened.clear()  # from here on, nothing outside the bundle may be opened
    expected = f"manifest field {field}.path: expected {RELPATH_RULE}, got {describe(path)}"

    with pytest.raises(BundleError) as err:
        open_bundle(bundle)
    assert str(err.value) == expected
    assert main(["inspect", str(bundle)]) == 2
    assert one_line(capsys, "inspect") == expected
    out = tmp_path / "out.png"
    assert main(["run", str(image(tmp_path)), "-o", str(out), "--bundle", str(bundle)]) == 2
    assert one_line(capsys, "run") == expected
    assert not out.exists()
    assert_not_read(opened, outside)
    assert tree(tmp_path) == before | {"in.png": (tmp_path / "in.png").read_bytes()}


@pytest.mark.parametrize("link", ["file", "folder"])
@pytest.mark.parametrize("what", ["engine", "calibration"])
def test_a_symlink_inside_the_bundle_is_refused_and_its_target_never_hashed(
        tmp_path: Path, outside: Path, opened: list[Path], capsys: pytest.CaptureFixture[str],
        what: str, link: str) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    field, holder = FIELDS[what]
    target = outside / ("secret.onnx" if what == "engine" else "calibration.json")
    if what == "engine" and link == "folder":  # engines/ itself leads out of the bundle
        for name in ("a4", "a6", "fp32"):
            (outside / f"{name}.onnx").write_bytes((bundle / f"engines/{name}.onnx").read_bytes())
        os.rename(bundle / "engines", tmp_path / "moved")
        os.symlink(outside, bundle / "engines")
        linked, shown = "engines/a4.onnx", "engines"
    elif what == "engine":
        (bundle / "engines/a4.onnx").unlink()
        os.symlink(target, bundle / "engines/a4.onnx")
        linked = shown = "engines/a4.onnx"
    else:  # the record, through a link named like it, or through a linked folder
        (bundle / "calibration.json").unlink()
        if link == "file":
            os.symlink(target, bundle / "calibration.json")
            linked = shown = "calibration.json"
        else:
            os.symlink(outside, bundle / "records")
            linked, shown = "records/calibration.json", "records"
    real = target if link == "file" else outside / Path(linked).name
    key = "onnx" if what == "engine" else "file"
    tamper(bundle, lambda m: holder(m).__setitem__(key, file_entry(real, linked)))
    label = "engine 'a4'" if what == "engine" else "calibration record"
    expected = (f"{label}: {shown} is a symbolic link (bundle {bundle}); a bundle is closed "
                "(its files are regular files inside it): rebuild the bundle")
    opened.clear()

    with pytest.raises(BundleError) as err:
        open_bundle(bundle)
    assert str(err.value) == expected
    assert main(["inspect", str(bundle)]) == 1  # the table is printed, the file FAILED
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines()
               if (line.startswith("  a4 ") if what == "engine" else "record" in line))
    assert "FAILED" in row and "symbolic link" in row and "sha256 ok" not in row
    out = tmp_path / "out.png"
    assert main(["run", str(image(tmp_path)), "-o", str(out), "--bundle", str(bundle)]) == 2
    assert one_line(capsys, "run") == expected
    assert not out.exists()
    assert_not_read(opened, outside)


def test_a_checksum_error_never_shows_the_hash_of_an_outside_file(
        tmp_path: Path, outside: Path, opened: list[Path]) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    (bundle / "engines/a4.onnx").unlink()
    os.symlink(outside / "secret.onnx", bundle / "engines/a4.onnx")  # manifest hash: the old file
    opened.clear()
    with pytest.raises(BundleError) as err:
        open_bundle(bundle)
    assert_not_read(opened, outside)
    assert sha256_file(outside / "secret.onnx")[:12] not in str(err.value)
    assert "symbolic link" in str(err.value)


@pytest.mark.parametrize("trick", ["absolute", "dotdot", "symlink", "symlinked folder"])
def test_a_tampered_profile_path_is_never_read_by_the_budget_policy(
        tmp_path: Path, outside: Path, opened: list[Path], capsys: pytest.CaptureFixture[str],
        trick: str) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    target = outside / "profile.json"
    if trick == "symlink":
        os.symlink(target, bundle / "profile.json")
        path = "profile.json"
        expected = (f"the profile named by the manifest: profile.json is a symbolic link "
                    f"(bundle {bundle}); a bundle is closed (its files are regular files inside "
                    "it): rebuild the bundle")
    elif trick == "symlinked folder":
        os.symlink(outside, bundle / "profiles")
        path = "profiles/profile.json"
        expected = (f"the profile named by the manifest: profiles is a symbolic link "
                    f"(bundle {bundle}); a bundle is closed (its files are regular files inside "
                    "it): rebuild the bundle")
    else:
        path = _escape(trick, target)
        expected = f"manifest field profile: expected {RELPATH_RULE}, got {describe(path)}"
    tamper(bundle, lambda m: m.__setitem__("profile", path))
    opened.clear()

    with pytest.raises(BundleError) as err:
        load_latencies(bundle, read_manifest(bundle))
    assert str(err.value) == expected
    out = tmp_path / "out.png"
    assert main(["run", str(image(tmp_path)), "-o", str(out), "--bundle", str(bundle),
                 "--policy", "budget:5"]) == 2
    assert one_line(capsys, "run") == expected
    assert not out.exists()
    if trick.startswith("symlink"):
        assert main(["inspect", str(bundle)]) == 1
        row = next(line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("  profile"))
        assert "FAILED" in row and "symbolic link" in row
    assert_not_read(opened, outside)


def test_an_untampered_profile_inside_the_bundle_is_read(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    (bundle / "profiles").mkdir()
    (bundle / "profiles/profile.json").write_text(json.dumps(PROFILE))
    tamper(bundle, lambda m: m.__setitem__("profile", "profiles/profile.json"))
    table = load_latencies(bundle, read_manifest(bundle))
    assert dict(table.per_tile_ms) == {"a4": 1.0, "a6": 1.0, "fp32": 1.0}


# ---------------------------------------------------------------- build --finish

@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake TensorRT 10 (tests/compiler/test_tensorrt_build.py) on a fake Orin Nano."""
    from compiler.engines import tensorrt_build as trt_build
    from targets.loader import DeviceFacts
    from tests.compiler.test_tensorrt_build import Knobs, Record, make_fake_tensorrt

    fake = make_fake_tensorrt("10.3.0.30", Knobs(input_shape=(2, 3, 8, 8)), Record())
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_build, "device_name", lambda: "Orin (fake)")
    monkeypatch.setattr("compiler.backends.tensorrt.probe_device", lambda: DeviceFacts(
        "aarch64", "NVIDIA Jetson Orin Nano Developer Kit"))


def tensorrt_bundle(root: Path) -> Path:
    """The portable half of a TensorRT bundle: ONNX graphs a4 / a6 / fp32, no plans yet."""
    for name, bias in (("a4", 0.0), ("a6", 1 / 255), ("fp32", 2 / 255)):
        atomic_write_bytes(root / "engines" / f"{name}.onnx", nearest_onnx(2, bias))
    atomic_write_bytes(root / "calibration.json", b"{}\n")
    from runtime.manifest import write_manifest

    manifest = make_manifest(root=root, backend="tensorrt", tile=8, overlap=2)
    engines = tuple(replace(spec, input_shape=(2, 3, 8, 8)) for spec in manifest.engines)
    write_manifest(root, replace(manifest, engines=engines))
    return root


def test_finish_with_an_engine_named_out_of_the_bundle_writes_nothing(
        tmp_path: Path, fake_device: None) -> None:
    from compiler.engines.finish import finish_bundle
    from targets.loader import load_target

    bundle = tensorrt_bundle(tmp_path / "a" / "b" / "bundle")
    tamper(bundle, lambda m: m["engines"][0].__setitem__("name", "../../../x/PWNED"))
    before = tree(tmp_path)
    with pytest.raises(BundleError) as err:
        finish_bundle(bundle, load_target("jetson-orin-nano"))
    assert str(err.value) == (f"manifest field engines[0].name: expected {ENGINE_NAME_RULE}, "
                              "got '../../../x/PWNED'")
    assert tree(tmp_path) == before
    assert not (tmp_path / "a" / "x").exists()


def test_finish_builds_plans_inside_the_bundle(tmp_path: Path, fake_device: None) -> None:
    from compiler.engines.finish import finish_bundle
    from targets.loader import load_target

    bundle = tensorrt_bundle(tmp_path / "bundle")
    finished = finish_bundle(bundle, load_target("jetson-orin-nano"))
    plans = sorted(p.name for p in (bundle / "engines").glob("*.plan"))
    assert [spec.plan.path.split("/")[0] for spec in finished.engines if spec.plan] == [
        "engines"] * 3
    assert len(plans) == 3 and sorted(tree(tmp_path)) == sorted(
        f"bundle/{name}" for name in ["calibration.json", "manifest.json", "timing.cache",
                                      "engines/a4.onnx", "engines/a6.onnx", "engines/fp32.onnx",
                                      *(f"engines/{p}" for p in plans)])


def test_finish_refuses_a_symlinked_engines_folder(tmp_path: Path, fake_device: None) -> None:
    from compiler.engines.finish import finish_bundle
    from targets.loader import load_target

    bundle = tensorrt_bundle(tmp_path / "bundle")
    elsewhere = tmp_path / "elsewhere"
    os.rename(bundle / "engines", elsewhere)
    os.symlink(elsewhere, bundle / "engines")
    before = tree(elsewhere)
    with pytest.raises(BundleError, match=r"^engine 'a4': engines is a symbolic link "
                                          r"\(bundle .*\); a bundle is closed"):
        finish_bundle(bundle, load_target("jetson-orin-nano"))
    assert tree(elsewhere) == before


# ---------------------------------------------------------------- external data

def external_graph(folder: Path, name: str, location: str) -> Path:
    """The tiny engine graph saved with its tensors in the external file ``location``."""
    model = onnx.load_from_string(nearest_onnx(2, 0.0))
    path = folder / name
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


@pytest.mark.parametrize("location", ["a4.onnx.data", "../../outside/secret.bin"])
def test_an_engine_with_external_data_is_refused(
        tmp_path: Path, opened: list[Path], capsys: pytest.CaptureFixture[str],
        location: str) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    (tmp_path / "outside").mkdir()
    graph = external_graph(bundle / "engines", "a4.onnx", "a4.onnx.data")
    if location.startswith(".."):  # the data file lies outside the bundle
        os.rename(bundle / "engines" / "a4.onnx.data", tmp_path / "outside" / "secret.bin")
        model = onnx.load(str(graph), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        graph.write_bytes(model.SerializeToString())
    tamper(bundle, lambda m: m["engines"][0].__setitem__(
        "onnx", file_entry(graph, "engines/a4.onnx")))  # the graph's own checksum is right
    opened.clear()
    expected = ("engine 'a4': a4.onnx keeps tensors in external data files (scales, bias); "
                "bundle engines must be single ONNX files (no checksum covers external data): "
                "rebuild the bundle")
    with pytest.raises(BundleError) as err:
        open_bundle(bundle)
    assert str(err.value) == expected
    with pytest.raises(BundleError) as err:  # also when the checksums are not verified
        open_bundle(bundle, verify=False).engine("a4")
    assert str(err.value) == expected
    out = tmp_path / "out.png"
    assert main(["run", str(image(tmp_path)), "-o", str(out), "--bundle", str(bundle)]) == 2
    assert one_line(capsys, "run") == expected
    assert_not_read(opened, tmp_path / "outside")


def test_the_bundle_writer_refuses_an_external_data_graph(tmp_path: Path) -> None:
    from runtime.manifest import file_ref

    graph = external_graph(tmp_path, "g.onnx", "g.onnx.data")
    with pytest.raises(BundleError, match=r"^engine graph g.onnx: g.onnx keeps tensors in "
                                          r"external data files \(scales, bias\)"):
        file_ref(tmp_path, graph)


def test_external_data_scan_field_numbers_match_onnx() -> None:
    from runtime import bundlepaths as b

    ours = {
        ("ModelProto", "graph"): b.MODEL_GRAPH, ("ModelProto", "functions"): b.MODEL_FUNCTIONS,
        ("GraphProto", "node"): b.GRAPH_NODE, ("GraphProto", "initializer"): b.GRAPH_INITIALIZER,
        ("GraphProto", "sparse_initializer"): b.GRAPH_SPARSE_INITIALIZER,
        ("NodeProto", "attribute"): b.NODE_ATTRIBUTE, ("FunctionProto", "node"): b.FUNCTION_NODE,
        ("AttributeProto", "t"): b.ATTR_T, ("AttributeProto", "g"): b.ATTR_G,
        ("AttributeProto", "tensors"): b.ATTR_TENSORS, ("AttributeProto", "graphs"): b.ATTR_GRAPHS,
        ("AttributeProto", "sparse_tensor"): b.ATTR_SPARSE,
        ("AttributeProto", "sparse_tensors"): b.ATTR_SPARSES,
        ("SparseTensorProto", "values"): b.SPARSE_VALUES,
        ("SparseTensorProto", "indices"): b.SPARSE_INDICES,
        ("TensorProto", "name"): b.TENSOR_NAME,
        ("TensorProto", "external_data"): b.TENSOR_EXTERNAL_DATA,
        ("TensorProto", "data_location"): b.TENSOR_DATA_LOCATION,
    }
    theirs = {(message, name): getattr(onnx, message).DESCRIPTOR.fields_by_name[name].number
              for message, name in ours}
    assert theirs == ours
    assert onnx.TensorProto.EXTERNAL == b.EXTERNAL


def test_external_data_in_a_subgraph_constant_is_found() -> None:
    from onnx import TensorProto, helper, numpy_helper

    tensor = numpy_helper.from_array(np.ones(3, np.float32), "hidden")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../x.bin"
    const = helper.make_node("Constant", [], ["c"], value=tensor)
    branch = helper.make_graph([const], "branch", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph)
    assert external_data_tensors(model.SerializeToString()) == ["hidden", "hidden"]
    assert external_data_tensors(nearest_onnx(2, 0.0)) == []


# ---------------------------------------------------------------- fields of the manifest

Case = tuple[str, Edit, str]
CASES: list[Case] = [
    ("tile 10^9", lambda m: m.__setitem__("tile", 10**9),
     "manifest field tile: expected an integer in 8..4096, got 1000000000"),
    ("scale 10^6", lambda m: m["model"].__setitem__("scale", 10**6),
     "manifest field model.scale: expected an integer in 1..8, got 1000000"),
    ("threads 10^6", lambda m: m.__setitem__("threads", 1000000),
     "manifest field threads: expected an integer in 0..256, got 1000000"),
    ("overlap of a whole tile", lambda m: m.__setitem__("overlap", 16),
     "manifest field overlap: expected an integer in 0..7, got 16"),
    ("statistic version 2", lambda m: m.__setitem__("statistic", "sobel-complexity/2"),
     "manifest field statistic: expected 'sobel-complexity/1' (the statistic this adasr "
     "computes; rebuild the bundle with this version), got 'sobel-complexity/2'"),
    ("engine named out of the bundle", lambda m: m["engines"][1].__setitem__(
        "name", "../../../x/PWNED"),
     f"manifest field engines[1].name: expected {ENGINE_NAME_RULE}, got '../../../x/PWNED'"),
    ("reversed thresholds", lambda m: m.__setitem__("thresholds", [40.0, 10.0]),
     "manifest field thresholds: expected two ordered numbers (lower <= upper), got [40.0, "
     "10.0]"),
    ("NaN threshold", lambda m: m.__setitem__("thresholds", [float("nan"), 10.0]),
     "manifest field thresholds[0]: expected a finite number, got nan"),
    ("method foo", lambda m: m["calibration"].__setitem__("method", "foo"),
     "manifest field calibration.method: unknown method 'foo'; allowed: adabm, cadyq, ddtb, "
     "granular, minmax, percentile"),
    ("W99A99", lambda m: m["calibration"].__setitem__("wbits", 99),
     "manifest field calibration.wbits: expected an integer in 2..8, got 99"),
    ("missing key", lambda m: m["engines"][2].pop("fab"),
     "manifest field engines[2].fab: missing"),
    ("string tile", lambda m: m.__setitem__("tile", "16"),
     "manifest field tile: expected an integer in 8..4096, got '16'"),
    ("backslash path", lambda m: m["engines"][0]["onnx"].__setitem__("path", "engines\\a4.onnx"),
     f"manifest field engines[0].onnx.path: expected {RELPATH_RULE}, got 'engines\\\\a4.onnx'"),
    ("drive letter", lambda m: m["engines"][0]["onnx"].__setitem__("path", "C:/a4.onnx"),
     f"manifest field engines[0].onnx.path: expected {RELPATH_RULE}, got 'C:/a4.onnx'"),
    ("null engine", lambda m: m["engines"].__setitem__(0, None),
     "manifest field engines[0]: expected an object, got null"),
    ("newline in a string", lambda m: m["build"].__setitem__("finish_command", "a\nb"),
     "manifest field build.finish_command: expected a string of at most 4096 characters without "
     "control characters, got 'a\\nb'"),
    ("target given as a path", lambda m: m.__setitem__("target", "../../../tmp/evil.toml"),
     f"manifest field target: expected {TARGET_NAME_RULE}, got '../../../tmp/evil.toml'"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_manifest_field_is_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Edit, message: str) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    tamper(bundle, edit)
    with pytest.raises(BundleError) as err:
        read_manifest(bundle)
    assert str(err.value) == message
    assert main(["inspect", str(bundle)]) == 2
    assert one_line(capsys, "inspect") == message


def test_device_match_null_means_any_device(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    tamper(bundle, lambda m: m.__setitem__("device_match", None))
    assert read_manifest(bundle).device_match.machine == ()
    assert open_bundle(bundle, machine="riscv64").manifest.device_match.machine == ()
    out = tmp_path / "out.png"
    assert main(["run", str(image(tmp_path)), "-o", str(out), "--bundle", str(bundle)]) == 0
    assert Image.open(out).size == (48, 40)


def test_device_match_with_a_null_rule_means_that_rule_is_open(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    tamper(bundle, lambda m: m["device_match"].__setitem__("machine", None))
    assert read_manifest(bundle).device_match.machine == ()
    with pytest.raises(BundleError, match=r"^manifest field device_match.gpu_name\[0\]: expected "
                                          r"a string of at most 256 characters without control "
                                          r"characters, got 3$"):
        tamper(bundle, lambda m: m["device_match"].__setitem__("gpu_name", [3]))
        read_manifest(bundle)


# ---------------------------------------------------------------- the rules themselves

@pytest.mark.parametrize("path", ["engines/a4.onnx", "calibration.json", "a/b/c.plan",
                                  "engines/int8.0123456789ab.plan", "..a", "a..b"])
def test_relative_paths_accepted(path: str) -> None:
    assert relpath_problem(path) is None


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/",
                                  ".", "..", "a\\b", "C:x", "c:\\x", "a\x00b", "a\nb",
                                  "x" * 513])
def test_relative_paths_refused(path: str) -> None:
    assert relpath_problem(path) == RELPATH_RULE


@pytest.mark.parametrize("name", ["int8", "fp32", "fp16", "int8-low", "int8-mid", "int8-high",
                                  "mixed", "mixed-low", "fp32-reference", "a4", "x" * 64])
def test_engine_names_the_planner_makes_are_valid(name: str) -> None:
    assert engine_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a..b", "Int8", "-x", ".x", "a b",
                                  "x" * 65, "a\\b", "é"])
def test_unsafe_engine_names_are_refused(name: str) -> None:
    assert engine_name_problem(name) == ENGINE_NAME_RULE


def test_bundle_path_allows_a_missing_file_and_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "engines").mkdir(parents=True)
    os.symlink(real, tmp_path / "link")  # the user's own path to the bundle may be a link
    assert bundle_path(tmp_path / "link", "engines/new.plan", "x") == (
        tmp_path / "link/engines/new.plan")
    with pytest.raises(BundleError, match=r"^x: path '\.\./y' of bundle .* is refused"):
        bundle_path(real, "../y", "x")


def test_finish_never_loads_a_target_file_named_by_the_manifest(
        tmp_path: Path, opened: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tensorrt_bundle(tmp_path / "bundle")
    evil = tmp_path / "evil.toml"
    evil.write_text('name = "evil"\n')
    tamper(bundle, lambda m: m.__setitem__("target", str(evil)))
    opened.clear()
    assert main(["build", "--finish", str(bundle)]) == 2
    assert one_line(capsys, "build") == (f"manifest field target: expected {TARGET_NAME_RULE}, "
                                         f"got {describe(str(evil))}")
    assert evil.resolve() not in opened


def test_the_planner_refuses_a_tile_the_manifest_would_refuse() -> None:
    from compiler.plan import plan_engines
    from runtime.errors import ConfigError
    from targets.loader import load_target

    with pytest.raises(ConfigError, match=r"^tile 1000000000 / overlap 4: the tile must be "
                                          r"8\.\.4096 LR pixels"):
        plan_engines({}, load_target("cpu-x86"), tile=10**9, overlap=4)


def test_the_planner_refuses_an_unsafe_engine_name() -> None:
    from compiler.plan import PlannedEngine
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^planned engine name '\.\./x': expected "):
        PlannedEngine("../x", "int8", (0,), False, (), (), 8.0)


def test_manifests_made_in_code_keep_the_rules() -> None:
    with pytest.raises(BundleError, match="^engine name 'A/B': expected an engine name"):
        make_manifest({"A/B": ((-1, 0, 1), 4.0), "fp32": ((), 32.0)})
    with pytest.raises(BundleError, match="need tile in 8..4096"):
        make_manifest(tile=10**9)
    with pytest.raises(BundleError, match="^profile path '/x': expected a relative path"):
        make_manifest(profile="/x")


def test_machine_check_still_applies(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny-cpu-x86")
    with pytest.raises(BundleError, match="this machine is riscv64"):
        open_bundle(bundle, machine="riscv64")
    assert open_bundle(bundle, machine=platform.machine()).manifest.names == ("a4", "a6", "fp32")

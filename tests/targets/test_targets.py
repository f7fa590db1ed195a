"""targets/: shipped files load and state the deployment facts; validation; detection; CLI."""

from __future__ import annotations

import os
import platform
import shutil
import stat
from pathlib import Path

import pytest

import targets
from compiler.cli import main
from runtime.errors import ConfigError
from targets import DeviceFacts, detect_target, list_targets, load_target, match_target
from targets import loader as target_loader

TARGETS_DIR = Path(targets.__file__).resolve().parent
SHIPPED = sorted(path.stem for path in TARGETS_DIR.glob("*.toml"))
REQUIRED = {"cpu-x86", "cpu-arm64", "jetson-orin-nano", "jetson-agx-orin", "jetson-thor",
            "rtx-4090", "h100"}
JETSONS = {"jetson-orin-nano", "jetson-agx-orin", "jetson-thor"}

CUSTOM = """\
name = "my-board"
description = "a test board"
backend = "tensorrt"
tensorrt = { min = "10.3", max = "10.3" }
gpu_arch = "ampere"
max_opset = 17
default_tile = 64
default_overlap = 4
precision_ladder = ["int8", "fp16"]
top_precision = "fp16"

[device_match]
jetson_model = ["My Board"]
"""


def _write(tmp_path: Path, text: str, name: str = "my-board") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, old: str, new: str) -> str:
    assert old in CUSTOM, old
    with pytest.raises(ConfigError) as info:
        load_target(_write(tmp_path, CUSTOM.replace(old, new)))
    return str(info.value)


@pytest.fixture
def no_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Jetson model file and no nvidia-smi on PATH; returns the (empty) PATH folder."""
    monkeypatch.setattr(target_loader, "DEVICE_TREE_MODEL", tmp_path / "no-model")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


# ---------------------------------------------------------------- shipped files


def test_shipped_set_is_complete() -> None:
    assert set(SHIPPED) >= REQUIRED
    assert sorted(t.name for t in list_targets()) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_file_loads(name: str) -> None:
    target = load_target(name)
    assert target.name == name
    assert target.source == TARGETS_DIR / f"{name}.toml"
    assert isinstance(target.precision_ladder, tuple) and target.precision_ladder
    assert target.top_precision == target.precision_ladder[-1]
    assert 2 * target.default_overlap < target.default_tile
    assert target.max_opset >= 13
    # loading by path gives the same target
    assert load_target(TARGETS_DIR / f"{name}.toml") == target
    if target.backend == "onnxruntime":
        assert target.tensorrt is None and target.gpu_arch is None and target.threads is not None
    else:
        assert target.tensorrt is not None and target.gpu_arch is not None
        assert target.threads is None


def test_target_is_frozen() -> None:
    target = load_target("cpu-x86")
    with pytest.raises(AttributeError):
        target.max_opset = 99  # type: ignore[misc]


def test_precision_facts() -> None:
    by_name = {t.name: t for t in list_targets()}
    for name in ("jetson-orin-nano", "jetson-agx-orin"):
        assert by_name[name].precision_ladder == ("int8", "fp16"), name  # never FP8 on Orin
    for name in ("rtx-4090", "h100", "jetson-thor"):
        assert "fp8" in by_name[name].precision_ladder, name
        assert by_name[name].precision_ladder[-2:] == ("int8", "fp16"), name
    # TensorRT has no sub-8-bit convolution kernels (no FP4 conv either): no fp4 rung anywhere
    assert all("fp4" not in t.precision_ladder for t in by_name.values())
    for t in by_name.values():
        expected = "fp32" if t.backend == "onnxruntime" else "fp16"
        assert t.top_precision == expected, t.name
    assert by_name["cpu-x86"].precision_ladder == ("int8", "fp32")
    assert by_name["cpu-arm64"].precision_ladder == ("int8", "fp32")


def test_tensorrt_facts() -> None:
    thor = load_target("jetson-thor")
    assert thor.gpu_arch == "blackwell"
    assert thor.tensorrt is not None and thor.tensorrt.contains("11.4.0")
    assert not thor.tensorrt.contains("10.3.0") and not thor.tensorrt.contains("12.0")
    nano = load_target("jetson-orin-nano")
    assert nano.tensorrt is not None and str(nano.tensorrt) == "10.3.x"
    assert nano.tensorrt.contains("10.3.0.30") and not nano.tensorrt.contains("10.4.0")
    agx = load_target("jetson-agx-orin")
    assert agx.tensorrt is not None
    assert agx.tensorrt.contains("10.3.0") and agx.tensorrt.contains("11.4.1")
    assert load_target("cpu-x86").backend == "onnxruntime"
    assert load_target("rtx-4090").gpu_arch == "ada"
    assert load_target("h100").gpu_arch == "hopper"


@pytest.mark.parametrize("key", ["strongly_typed = true", "legacy_precision_flags = false",
                                 "dla_cores = 2"])
def test_removed_build_keys_are_unknown(tmp_path: Path, key: str) -> None:
    """adasr builds strongly typed networks only and never uses DLA: those keys are gone."""
    message = _error(tmp_path, "max_opset = 17", f"max_opset = 17\n{key}")
    assert f"unknown key '{key.split()[0]}'" in message and "\n" not in message


# ---------------------------------------------------------------- names, paths, validation


def test_unknown_name_suggests_and_lists() -> None:
    with pytest.raises(ConfigError) as info:
        load_target("jetson-orin-nanoo")
    message = str(info.value)
    assert "unknown target 'jetson-orin-nanoo'" in message
    assert "did you mean 'jetson-orin-nano'?" in message
    for name in SHIPPED:
        assert name in message
    assert "\n" not in message


def test_missing_file_path() -> None:
    with pytest.raises(ConfigError, match="target file not found"):
        load_target("./no-such-board.toml")


def test_custom_target_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, CUSTOM)
    target = load_target(path)
    assert target.name == "my-board" and target.source == path
    assert target.precision_ladder == ("int8", "fp16")
    assert target.device_match.jetson_model == ("My Board",)
    # also as a relative string path
    monkeypatch.chdir(tmp_path)
    assert load_target("./my-board.toml") == target
    assert load_target("my-board.toml") == target


def test_unknown_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    message = _error(tmp_path, "default_tile = 64", "default_tiles = 64")
    assert "unknown key 'default_tiles'" in message
    assert "did you mean 'default_tile'?" in message
    assert "my-board.toml" in message
    assert "allowed:" in message and "precision_ladder" in message


def test_unknown_nested_keys(tmp_path: Path) -> None:
    message = _error(tmp_path, 'max = "10.3"', 'maximum = "10.3"')
    assert "unknown key in [tensorrt] 'maximum'" in message and "'max'" in message
    message = _error(tmp_path, "jetson_model = ", "jetson_modle = ")
    assert "did you mean 'jetson_model'?" in message


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('backend = "tensorrt"', 'backend = "tensorrtt"', "did you mean 'tensorrt'?"),
    ('["int8", "fp16"]', "[]", "precision_ladder must not be empty"),
    ('["int8", "fp16"]', '["int8", "fp9"]', "unknown precision 'fp9'"),
    ('["int8", "fp16"]', '["fp16", "int8"]', "must be cheapest first"),
    ('["int8", "fp16"]', '["int8", "int8", "fp16"]', "repeats a precision"),
    ('["int8", "fp16"]', '["fp8", "int8", "fp16"]', "has 'fp8' but gpu_arch 'ampere'"),
    ('["int8", "fp16"]', '["fp4", "int8", "fp16"]', "has 'fp4' but gpu_arch 'ampere'"),
    ('top_precision = "fp16"', 'top_precision = "fp32"', "ladder's most precise rung"),
    ("max_opset = 17", "max_opset = 12", "max_opset must be >= 13, got 12"),
    ("max_opset = 17", 'max_opset = "17"', "max_opset must be an integer"),
    ("default_overlap = 4", "default_overlap = 32", "twice the overlap"),
    ('name = "my-board"', 'name = "other"', "must agree"),
    ('description = "a test board"', 'description = ""', "non-empty string"),
    ('min = "10.3"', 'min = "ten"', "must be a version like"),
    ('max = "10.3"', 'max = "10.2"', "is below min"),
    ("default_tile = 64", "default_tile = 64\nthreads = 2", "threads is not allowed"),
    ('backend = "tensorrt"', 'backend = "onnxruntime"', "tensorrt is not allowed"),
])
def test_bad_values_are_one_line_errors(tmp_path: Path, old: str, new: str,
                                        expected: str) -> None:
    message = _error(tmp_path, old, new)
    assert expected in message
    assert "\n" not in message
    assert "my-board.toml" in message


def test_tensorrt_before_10_is_not_a_target(tmp_path: Path) -> None:
    jetpack5 = CUSTOM.replace('min = "10.3", max = "10.3"', 'min = "8.5", max = "8.5"')
    with pytest.raises(ConfigError, match=r"8\.5\.x: .*JetPack 5's TensorRT 8\.5 and Python 3\.8"):
        load_target(_write(tmp_path, jetpack5))


def test_cpu_target_rules(tmp_path: Path) -> None:
    cpu = (TARGETS_DIR / "cpu-x86.toml").read_text().replace('"cpu-x86"', '"my-board"')
    assert load_target(_write(tmp_path, cpu)).threads == 0
    for old, new, expected in [
        ('["int8", "bf16", "fp32"]', '["fp8", "fp32"]',
         r"no backend of this target \(ONNX Runtime, OpenVINO\) has fp8 kernels"),
        ('machine = ["x86_64", "amd64"]', 'gpu_name = ["RTX"]',
         "is for GPU targets; CPU targets match on 'machine'"),
        ("threads = 0 ", "threads = -1 ", "threads must be >= 0"),
    ]:
        assert old in cpu, old
        with pytest.raises(ConfigError, match=expected):
            load_target(_write(tmp_path, cpu.replace(old, new)))


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_target(_write(tmp_path, CUSTOM + "\nname = [\n"))


# ---------------------------------------------------------------- detection


def test_detect_target_here() -> None:
    if (platform.machine() != "x86_64" or shutil.which("nvidia-smi")
            or Path("/proc/device-tree/model").exists()):
        pytest.skip("not a plain x86-64 CPU-only machine")
    assert detect_target().name == "cpu-x86"


def test_detect_cpu_arch(monkeypatch: pytest.MonkeyPatch, no_device: Path) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert detect_target().name == "cpu-x86"
    monkeypatch.setattr(platform, "machine", lambda: "AMD64")
    assert detect_target().name == "cpu-x86"
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert detect_target().name == "cpu-arm64"
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(ConfigError, match="no target matches this machine"):
        detect_target()


@pytest.mark.parametrize(("model", "expected"), [
    ("NVIDIA Jetson Orin Nano Developer Kit", "jetson-orin-nano"),
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "jetson-orin-nano"),
    ("Jetson AGX Orin Developer Kit", "jetson-agx-orin"),
    ("NVIDIA Jetson AGX Thor Developer Kit", "jetson-thor"),
    ("Raspberry Pi 5 Model B Rev 1.0", "cpu-arm64"),
])
def test_detect_jetson_from_model_file(monkeypatch: pytest.MonkeyPatch, no_device: Path,
                                       tmp_path: Path, model: str, expected: str) -> None:
    model_file = tmp_path / "model"
    model_file.write_bytes(model.encode() + b"\x00")  # the device tree NUL-terminates it
    monkeypatch.setattr(target_loader, "DEVICE_TREE_MODEL", model_file)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert detect_target().name == expected


def _fake_nvidia_smi(bin_dir: Path, output: str, rc: int = 0) -> None:
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\nexit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(os.name != "posix", reason="fake nvidia-smi is a shell script")
@pytest.mark.parametrize(("gpu", "expected"), [
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA GeForce GTX 1080", "cpu-x86"),  # unknown GPU: falls back to the CPU target
])
def test_detect_gpu_with_nvidia_smi(monkeypatch: pytest.MonkeyPatch, no_device: Path,
                                    gpu: str, expected: str) -> None:
    _fake_nvidia_smi(no_device, gpu)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert detect_target().name == expected


@pytest.mark.skipif(os.name != "posix", reason="fake nvidia-smi is a shell script")
def test_failing_nvidia_smi_is_ignored(monkeypatch: pytest.MonkeyPatch, no_device: Path) -> None:
    _fake_nvidia_smi(no_device, "NVIDIA-SMI has failed", rc=9)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert detect_target().name == "cpu-x86"


def test_match_prefers_jetson_and_longest_pattern() -> None:
    facts = DeviceFacts(machine="aarch64", jetson_model="NVIDIA Jetson AGX Orin",
                        gpu_name="Orin (nvgpu)")
    assert match_target(facts).name == "jetson-agx-orin"
    assert match_target(DeviceFacts(machine="aarch64")).name == "cpu-arm64"


# ---------------------------------------------------------------- CLI


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        assert name in out
    detected = detect_target().name
    marked = [line for line in out.splitlines() if line.startswith("*  ")]
    assert len(marked) == 1 and marked[0].split()[1] == detected
    assert "10.3.x" in out and "strongly typed" in out and "fp8 int8 fp16" in out


def test_cli_details(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["targets", "jetson-thor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("jetson-thor") and "strongly typed" in out and "24" in out
    assert main(["targets", str(_write(tmp_path, CUSTOM))]) == 0
    assert "my-board" in capsys.readouterr().out


def test_cli_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets", "jetson-orin-nanoo"]) == 2
    captured = capsys.readouterr()
    assert "did you mean 'jetson-orin-nano'?" in captured.err
    assert captured.out == ""

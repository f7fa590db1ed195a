"""``adasr profile``: exit codes, one-line errors, the checkable JSON, plots, --compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler.cli import main
from runtime.manifest import read_manifest
from tests.profiles.conftest import ENGINES


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_profile_writes_json_plots_and_updates_the_bundle(
        tiny_bundle: Path, benchmark_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out, plots, results = tmp_path / "out.json", tmp_path / "plots", tmp_path / "results"
    code = main(["profile", str(tiny_bundle), "--json", str(out), "--plots", str(plots),
                 "--results", str(results), "--dataset", str(benchmark_dir), "--quick",
                 "--runs", "3", "--batch", "2", "--quiet", "--no-video"])
    assert code == 0
    data = json.loads(out.read_text())
    assert [e["name"] for e in data["engines"]] == list(ENGINES)
    for entry in [*data["engines"], data["adaptive"]]:
        assert {"name", "latency_ms", "psnr", "fab"} <= set(entry)
        assert entry["latency_ms"]["p10"] <= entry["latency_ms"]["median"] \
            <= entry["latency_ms"]["p90"]
    assert data["engines"][0]["latency_ms"]["runs"] == 3 * 2  # --runs 3, quick repeat 2
    assert data["settings"]["batches"] == [2]
    assert json.loads((results / "cpu-x86" / "tiny.json").read_text()) == data
    assert read_manifest(tiny_bundle).profile == "profile.json"
    assert {p.name for p in plots.iterdir()} == {"latency.png", "pareto.png", "layers.png",
                                                  "report.md"}
    printed = capsys.readouterr().out
    assert "Pareto:" in printed and f"wrote {out}" in printed

    code = main(["profile", "--compare", str(out), str(results / "cpu-x86" / "tiny.json")])
    assert code == 0
    table = capsys.readouterr().out
    assert table.count("1.00x") == len(ENGINES) * 2 + 1  # entries, per-frame rows, adaptive


@pytest.mark.parametrize(("args", "message"), [
    (["profile", "no/such/bundle"], "bundle no/such/bundle does not exist"),
    (["profile"], "nothing to profile"),
    (["profile", "B", "--runs", "5"], "runs must be >= 20"),
    (["profile", "--compare", "a.json", "b.json"], "profile a.json does not exist"),
    (["profile", "B", "--threads", "1,1000000"], "--threads must be in 0..256, got 1000000"),
    (["profile", "B", "--tiles", "1000000000"], "--tiles must be in 8..4096, got 1000000000"),
    (["profile", "B", "--batch", "0"], "--batch must be in 1..1024, got 0"),
])
def test_errors_exit_2_with_one_line(args: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    line = _error_line(capsys)
    assert line.startswith("adasr profile: error: ") and message in line


def test_runs_below_twenty_refused_before_measuring(tiny_bundle: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", str(tiny_bundle), "--runs", "19"]) == 2
    assert "use --quick" in _error_line(capsys)
    assert read_manifest(tiny_bundle).profile is None


def test_bad_list_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "B", "--batch", "1,x"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_profile_writes_into_the_bundle_not_the_package(
        tiny_bundle: Path, benchmark_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14: the default wrote into the package's own committed profiles/results."""
    from profiles.profiler import RESULTS_DIR

    committed = sorted(str(p) for p in RESULTS_DIR.rglob("*"))
    args = ["profile", str(tiny_bundle), "--dataset", str(benchmark_dir), "--quick", "--runs",
            "2", "--batch", "1", "--layer-runs", "0", "--quiet", "--no-video"]
    assert main(args) == 0
    assert sorted(str(p) for p in RESULTS_DIR.rglob("*")) == committed
    assert {p.name for p in (tiny_bundle / "profile").iterdir()} == {
        "latency.png", "pareto.png", "layers.png", "report.md"}
    assert f"wrote {tiny_bundle / 'profile' / 'report.md'}" in capsys.readouterr().out
    assert main(args) == 0  # its own folder: a re-run replaces it without --force
    manifest = (tiny_bundle / "manifest.json").read_bytes()
    assert main([*args, "--json", str(tiny_bundle / "engines" / "a4.onnx")]) == 2
    assert _error_line(capsys) == (f"adasr profile: error: --json {tiny_bundle}/engines/a4.onnx "
                                   "is an input: choose another name")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "report.md").write_text("my notes")
    assert main([*args, "--plots", str(tmp_path / "plots")]) == 2
    assert _error_line(capsys).endswith("report.md exists: give --force to overwrite it, or "
                                        "choose another name")
    assert (tmp_path / "plots" / "report.md").read_text() == "my notes"
    assert (tiny_bundle / "manifest.json").read_bytes() == manifest

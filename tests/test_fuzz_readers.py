"""Property-based fuzzing of the typed readers (issue 14): any edit of a real manifest or a real
calibration record gives either a validated result or one of the project's own errors.

Each example applies 1-4 mutations to a real document -- drop a key or list item, put an odd JSON
value in any field (wrong types, huge / negative / NaN / infinite numbers, path tricks, nested
nulls), scale a number, wrap a value in a list or object -- and reads it. A result must keep every
rule the reader promises (paths inside the bundle, bounded numbers, ordered thresholds ...); any
exception other than an :class:`~runtime.errors.AdasrError` fails the test.

The default run tries 1,200 manifests and 1,000 records (about 10 s). A bigger run:
``ADASR_FUZZ_EXAMPLES=20000 python -m pytest -q -s tests/test_fuzz_readers.py`` (per test); the
counts of examples, results and errors are printed at the end (``-s``).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.bundle import verify_file
from runtime.bundlepaths import engine_name_problem, relpath_problem
from runtime.errors import AdasrError
from runtime.manifest import (
    METHODS,
    QUANT_BITS,
    SCALES,
    STATISTIC,
    THREADS,
    TILES,
    Manifest,
    manifest_from_json,
    max_overlap,
)
from tests.conftest import calibrate_tiny
from tests.runtime.conftest import write_tiny_bundle

EXAMPLES = int(os.environ.get("ADASR_FUZZ_EXAMPLES", "0"))
TALLY: Counter[str] = Counter()


def fuzz_settings(default: int) -> Callable[[Any], Any]:
    return settings(max_examples=EXAMPLES or default, deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow,
                                                          HealthCheck.data_too_large])


TRICKS = ["../../x", "/etc/passwd", "a\\b", "C:/x", "", ".", "..", "engines/../../x",
          "engines//a4.onnx", "a\x00b", "engines/a4.onnx/", "sobel-complexity/2", "foo", "adabm",
          "int8", "fp32", "../../../x/PWNED", "onnxruntime", "tensorrt", "0" * 64, "NaN", "1e999",
          "calibration.json", "engines/a4.onnx", "\u202e", "é" * 3]
NUMBERS = [0, -1, 1, 2, 7, 8, 9, 16, 4096, 4097, 10**6, 10**9, 2**63, -2**63, 10**400, 0.5, -0.0,
           1e308, -1e308, 1e-308, math.nan, math.inf, -math.inf, True, False]
SCALARS = st.one_of(st.none(), st.booleans(), st.sampled_from(NUMBERS),
                    st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(TRICKS), st.text(max_size=12))
ODD = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["path", "name", "x", "0"]),
                                                 inner, max_size=3)), max_leaves=6)

Path_ = tuple[str | int, ...]


def locations(doc: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every location of ``doc`` (the root included), depth first."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from locations(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from locations(value, (*prefix, index))


def get(doc: Any, where: Path_) -> Any:
    for key in where:
        doc = doc[key]
    return doc


def mutate(doc: Any, data: st.DataObject) -> Any:
    """``doc`` with one random mutation (the root may be replaced: the result is returned)."""
    spots = list(locations(doc))
    where = spots[data.draw(st.integers(0, len(spots) - 1), label="location")]
    value = get(doc, where)
    kind = data.draw(st.sampled_from(["drop", "odd", "odd", "scale", "wrap", "null"]),
                     label="mutation")
    if kind == "scale" and isinstance(value, int | float) and not isinstance(value, bool):
        factor = data.draw(st.sampled_from([-1, 2, 10**6, 10**9, 1e-9, 0.5, math.nan]))
        new: Any = value * factor
    elif kind == "wrap":
        new = data.draw(st.sampled_from([[value], {"x": value}, [value, value]]))
    elif kind == "null":
        new = None
    else:
        new = data.draw(ODD, label="value")
    if not where:
        return new
    parent, key = get(doc, where[:-1]), where[-1]
    if kind == "drop":
        del parent[key]
    else:
        parent[key] = new
    return doc


def mutated(original: Any, data: st.DataObject) -> Any:
    doc = json.loads(json.dumps(original))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        doc = mutate(doc, data)
    return doc


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    for what in ("manifest", "record"):
        total = TALLY[f"{what} examples"]
        if total:
            print(f"\nfuzz {what}: {total} examples, {TALLY[f'{what} ok']} read, "
                  f"{TALLY[f'{what} AdasrError']} AdasrError, {TALLY[f'{what} other']} other "
                  "exceptions")


def read(what: str, parse: Callable[[], Any]) -> Any:
    """``parse()``; counts the outcome; re-raises anything but an AdasrError."""
    TALLY[f"{what} examples"] += 1
    try:
        result = parse()
    except AdasrError as err:
        TALLY[f"{what} AdasrError"] += 1
        assert "\n" not in str(err)
        return None
    except BaseException:
        TALLY[f"{what} other"] += 1
        raise
    TALLY[f"{what} ok"] += 1
    return result


# ---------------------------------------------------------------- manifest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("fuzz") / "tiny-cpu-x86")


def check_manifest(m: Manifest, root: Path) -> None:
    refs = [m.calibration.file, *(e.onnx for e in m.engines),
            *(e.plan for e in m.engines if e.plan is not None)]
    assert all(relpath_problem(ref.path) is None for ref in refs)
    assert m.profile is None or relpath_problem(m.profile) is None
    assert all(engine_name_problem(e.name) is None for e in m.engines)
    assert TILES[0] <= m.tile <= TILES[1] and 0 <= m.overlap <= max_overlap(m.tile)
    assert SCALES[0] <= m.model.scale <= SCALES[1] and THREADS[0] <= m.threads <= THREADS[1]
    low, high = m.thresholds
    assert math.isfinite(low) and math.isfinite(high) and low <= high
    assert m.statistic == STATISTIC and m.calibration.method in METHODS
    assert QUANT_BITS[0] <= m.calibration.wbits <= QUANT_BITS[1]
    for ref in refs:  # opening the files: inside the bundle, or a BundleError
        try:
            path = verify_file(root, ref, "fuzz")
        except AdasrError:
            continue
        assert path.resolve().is_relative_to(root.resolve())


@fuzz_settings(1200)
@given(data=st.data())
def test_any_edit_of_a_manifest_reads_or_is_a_clean_error(bundle: Path,
                                                          data: st.DataObject) -> None:
    doc = mutated(json.loads((bundle / "manifest.json").read_text()), data)
    manifest = read("manifest", lambda: manifest_from_json(doc))
    if manifest is not None:
        check_manifest(manifest, bundle)


# ---------------------------------------------------------------- calibration record


@pytest.fixture(scope="module")
def records(tiny: tuple[Path, Path]) -> list[dict[str, Any]]:
    import torch

    from compiler.quant.qmodel import QuantSettings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return list(calibrate_tiny(tiny, {
            "adabm": QuantSettings(method="adabm", wbits=8, abits=6, fq=True),
            "ddtb": QuantSettings(method="ddtb", wbits=4, abits=4)}).values())
    finally:
        torch.set_num_threads(threads)


@fuzz_settings(1000)
@given(data=st.data())
def test_any_edit_of_a_record_reads_or_is_a_clean_error(records: list[dict[str, Any]],
                                                        data: st.DataObject) -> None:
    from compiler.quant.record import record_from_json

    original = records[data.draw(st.integers(0, len(records) - 1), label="record")]
    doc = mutated(original, data)
    rec = read("record", lambda: record_from_json(doc))
    if rec is None:
        return
    low, high = rec.image_thresholds
    assert math.isfinite(low) and math.isfinite(high) and low <= high
    assert rec.settings.method in METHODS
    for bits in (rec.settings.wbits, rec.settings.abits):
        assert QUANT_BITS[0] <= bits <= QUANT_BITS[1]
    adaptive = sum(layer.kind == "adaptive" for layer in rec.layers)
    assert all(len(v) == adaptive for v in rec.bit_vectors.values())
    for layer in rec.layers:
        assert layer.a_bounds[0] <= layer.a_bounds[1]
        assert QUANT_BITS[0] <= layer.w_bits <= QUANT_BITS[1]

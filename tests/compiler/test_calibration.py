"""Calibration on a tiny EDSR and synthetic LR images: records, determinism, every method."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compiler.quant.calibrate import CalibrationConfig, Calibrator, calibrate
from compiler.quant.qmodel import QuantSettings
from compiler.quant.record import apply_record, read_record, save_record
from compiler.zoo import load_model
from compiler.zoo.edsr import EDSR
from runtime.errors import CalibrationError, ConfigError

FAST = CalibrationConfig(patches=8, patch_size=16, steps=20, batch=2, epochs=4, validation=4)


def _run(tiny: tuple[Path, Path], **settings: object):  # type: ignore[no-untyped-def]
    weights, calib = tiny
    return calibrate(load_model(weights), QuantSettings(**settings), FAST, calib)  # type: ignore


def test_record_rebuilds_the_same_network(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    result = _run(tiny, method="adabm", wbits=8, abits=4)
    path = tmp_path / "record.json"
    save_record(path, result.record)
    rebuilt = apply_record(load_model(tiny[0]), read_record(path))
    x = torch.rand(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(result.qnet(x), rebuilt(x))
    vectors = result.record["bit_vectors"]
    assert sorted(vectors) == ["-1", "0", "1"]
    assert all(len(v) == 4 for v in vectors.values())  # 2 blocks x 2 convs
    for d in (-1, 0, 1):
        assert [b - d for b in vectors[str(d)]] == vectors["0"]
    for layer in result.record["layers"]:  # FP ranges of the input (streams) and output (Q)
        (low, high), (a_low, a_high) = layer["input_range"], layer["a_bounds"]
        assert low < high and layer["output_range"][0] < layer["output_range"][1]
        assert low <= a_low + 1e-6 and a_high <= high * 1.5 + 1e-6
        conv = dict(rebuilt.qconvs())[layer["name"]]
        assert conv.input_range == tuple(layer["input_range"])


def test_same_seed_same_record(tiny: tuple[Path, Path]) -> None:
    def strip(record: dict) -> str:  # type: ignore[type-arg]
        record = json.loads(json.dumps(record))
        record["calibration"].pop("seconds")
        record["calibration"].pop("cpu_seconds")
        return json.dumps(record, sort_keys=True)

    first = _run(tiny, method="adabm", wbits=4, abits=4)
    second = _run(tiny, method="adabm", wbits=4, abits=4)
    assert strip(first.record) == strip(second.record)


@pytest.mark.parametrize("method", ["minmax", "percentile", "ddtb"])
def test_uniform_methods_use_base_bits(tiny: tuple[Path, Path], method: str) -> None:
    result = _run(tiny, method=method, wbits=4, abits=4, fq=True)
    assert result.record["bit_vectors"] == {"0": [4.0] * 4}
    kinds = [layer["kind"] for layer in result.record["layers"]]
    assert kinds.count("adaptive") == 4 and kinds.count("fixed") == 4  # head, body.2, tail x2
    gates = [layer["gate"] is not None for layer in result.record["layers"]]
    assert any(gates) == (method == "ddtb")


def test_quantized_output_is_close_to_full_precision_at_8_bits(tiny: tuple[Path, Path]) -> None:
    result = _run(tiny, method="minmax", wbits=8, abits=8)
    fp = load_model(tiny[0]).model
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        err = (result.qnet(x) - fp(x)).abs().max()
    assert float(err) < 0.02


def test_record_for_another_checkpoint_is_refused(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    result = _run(tiny, method="minmax", wbits=8, abits=8)
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(EDSR(2, 8, 2, 1.0, 255.0).state_dict(), other)
    with pytest.raises(CalibrationError, match="calibrate this checkpoint first"):
        apply_record(load_model(other), result.record)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="did you mean 'adabm'"):
        QuantSettings(method="adbm")
    with pytest.raises(ConfigError, match="allowed 2..8"):
        QuantSettings(abits=12)


def test_not_a_record(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("{\"schema\": \"other\"}")
    with pytest.raises(CalibrationError, match="unsupported record schema"):
        read_record(path)


def test_symmetric_activations_are_symmetric(tiny: tuple[Path, Path]) -> None:
    result = _run(tiny, method="adabm", wbits=8, abits=6, symmetric=True)
    for layer in result.record["layers"]:
        lower, upper = layer["a_bounds"]
        assert lower == pytest.approx(-upper)
    rebuilt = apply_record(load_model(tiny[0]), result.record)
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(result.qnet(x), rebuilt(x))


def test_default_weight_granularity_follows_the_weight_bits() -> None:
    w4 = QuantSettings(wbits=4)
    assert w4.weights_per_channel(4) and not w4.weights_per_channel(8)  # fq's 8-bit layers
    assert not QuantSettings(wbits=8).weights_per_channel(8)
    assert not QuantSettings(wbits=4, per_channel=False).weights_per_channel(4)
    assert QuantSettings(wbits=8, per_channel=True).weights_per_channel(8)
    with pytest.raises(ConfigError, match="bit-aware clipping mode"):
        CalibrationConfig(bac="sometimes")


@pytest.mark.parametrize(("abits", "mode", "clipped"), [
    (4, "auto", True), (6, "auto", False), (6, "on", True), (4, "off", False)])
def test_bit_aware_clipping_modes(tiny: tuple[Path, Path], abits: int, mode: str,
                                  clipped: bool) -> None:
    """BaC moves the bounds inside the calibrated range (never outside it); off keeps them."""
    weights, calib = tiny
    config = CalibrationConfig(patches=8, patch_size=16, steps=0, bac=mode)
    result = calibrate(load_model(weights), QuantSettings(wbits=8, abits=abits), config, calib)
    inside = [layer["a_bounds"][1] - layer["a_bounds"][0]
              < 0.999 * (layer["input_range"][1] - layer["input_range"][0])
              for layer in result.record["layers"]]
    assert any(inside) == clipped


def test_bit_margin_lowers_just_enough_layers(tiny: tuple[Path, Path]) -> None:
    """The budget lowers layers one bit each, only as many as the margin needs, never raises."""
    weights, calib = tiny
    settings = QuantSettings(method="adabm", wbits=8, abits=6)
    free = calibrate(load_model(weights), settings, replace(FAST, bit_margin=0.0), calib).record
    assert free["calibration"]["budget_lowered"] == []
    tight = calibrate(load_model(weights), settings, replace(FAST, bit_margin=0.5), calib).record
    before = [b - 6 for b in free["bit_vectors"]["0"]]
    after = [b - 6 for b in tight["bit_vectors"]["0"]]
    assert sum(after) <= -0.5 * len(after) < sum(after) + 1  # the margin met, by the fewest steps
    assert all(a <= b for a, b in zip(after, before, strict=True))
    lowered = tight["calibration"]["budget_lowered"]
    assert len(lowered) == sum(before) - sum(after) > 0
    names = [layer["name"] for layer in tight["layers"] if layer["kind"] == "adaptive"]
    for k, name in enumerate(names):
        assert before[k] - after[k] == lowered.count(name)
    with pytest.raises(ConfigError, match="bit margin"):
        CalibrationConfig(bit_margin=1.5)


def test_percentile_range_init_starts_inside_the_global_range(tiny: tuple[Path, Path]) -> None:
    """Adaptive layers start at the percentiles, inside the global range; fixed layers (fq) keep
    the global range."""
    weights, calib = tiny
    bounds, kinds = {}, []
    for init in ("global", "percentile"):
        config = CalibrationConfig(patches=8, patch_size=16, steps=0, bac="off", range_init=init)
        record = calibrate(load_model(weights), QuantSettings(wbits=8, abits=6, fq=True), config,
                           calib).record
        bounds[init] = [layer["a_bounds"] for layer in record["layers"]]
        kinds = [layer["kind"] for layer in record["layers"]]
    for kind, (g_low, g_high), (p_low, p_high) in zip(kinds, bounds["global"],
                                                      bounds["percentile"], strict=True):
        if kind == "fixed":
            assert (p_low, p_high) == (g_low, g_high)
        else:
            assert g_low <= p_low < p_high <= g_high
    assert "fixed" in kinds and bounds["percentile"] != bounds["global"]
    with pytest.raises(ConfigError, match="range init"):
        CalibrationConfig(range_init="median")


def test_bit_budget_reports_its_steps_on_the_progress_bar(tiny: tuple[Path, Path]) -> None:
    weights, calib = tiny
    bars: list[tuple[str, int, list[int]]] = []

    class Bar:
        def __init__(self, total: int, description: str) -> None:
            self.updates: list[int] = []
            bars.append((description, total, self.updates))

        def update(self, n: int) -> None:
            self.updates.append(n)

        def set_postfix(self, **_: object) -> None:
            pass

        def close(self) -> None:
            pass

    record = calibrate(load_model(weights), QuantSettings(method="adabm", wbits=8, abits=6),
                       replace(FAST, bit_margin=0.5), calib, progress=Bar).record
    budget = [(total, sum(updates)) for name, total, updates in bars if name == "bit budget"]
    assert budget == [(len(record["calibration"]["budget_lowered"]),) * 2]


def test_refine_keeps_the_bits_and_never_worsens_the_validated_loss(
        tiny: tuple[Path, Path]) -> None:
    """Refinement after the budget trains bounds and clips only: the bit vectors are those of the
    same run without it, the kept state's validation loss is the lowest seen, and the record of
    the refined network rebuilds it."""
    weights, calib = tiny
    settings = QuantSettings(method="adabm", wbits=4, abits=4)
    config = replace(FAST, bit_margin=0.5)
    plain = calibrate(load_model(weights), settings, config, calib).record
    refined = calibrate(load_model(weights), settings, replace(config, refine_steps=8),
                        calib)
    info = refined.record["calibration"]
    assert refined.record["bit_vectors"] == plain["bit_vectors"]
    assert len(info["refine_loss"]) == 3  # before, and after each of the two rounds
    best = info["refine_loss"][info["refine_best"]]
    assert best == min(info["refine_loss"])
    assert "refine_loss" not in plain["calibration"]
    with pytest.raises(ConfigError, match="refine steps"):
        CalibrationConfig(refine_steps=-1)


def test_granular_gives_every_layer_the_patch_bits(tiny: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    """Granular-DQ: one bit-width per patch shared by all adaptive layers, classes base - 2 /
    base / base + 2; no layer offsets; the record rebuilds the same network."""
    result = _run(tiny, method="granular", wbits=8, abits=6)
    record = result.record
    assert record["bit_vectors"] == {"-1": [4] * 4, "0": [6] * 4, "1": [8] * 4}
    assert {layer["layer_offset"] for layer in record["layers"]} == {0}
    assert record["calibration"]["budget_lowered"] == []
    assert len(record["calibration"]["validation_loss"]) == FAST.epochs + 1  # it trained
    path = tmp_path / "granular.json"
    save_record(path, record)
    rebuilt = apply_record(load_model(tiny[0]), read_record(path))
    x = torch.rand(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(result.qnet(x), rebuilt(x))
        bits = rebuilt.sample_bits()
    d_img = rebuilt.context.d_img.round()
    assert torch.equal(bits, 6 + 2 * d_img)


def test_granular_budget_holds_the_calibration_fab(tiny: tuple[Path, Path]) -> None:
    """The threshold budget: the calibration FAB over all patches is <= base - margin, the pair it
    chose is the least-L1 one of every allowed pair (brute force here), its thresholds are the
    record's; training does not depend on the margin, so the budget applied to a margin-0 record
    gives the same thresholds."""
    from compiler.quant.bitmap import complexity
    from compiler.quant.granular import class_losses, fit_threshold_budget, fp_outputs
    from compiler.quant.patches import sample_patches

    settings = QuantSettings(method="granular", wbits=8, abits=6)
    budgeted = calibrate(load_model(tiny[0]), settings, replace(FAST, bit_margin=0.5), tiny[1])
    plain = calibrate(load_model(tiny[0]), settings, replace(FAST, bit_margin=0.0), tiny[1])
    info = budgeted.record["calibration"]["threshold_budget"]
    assert plain.record["calibration"]["threshold_budget"] is None
    assert info["target"] == 5.5 and info["fab"] <= 5.5
    assert budgeted.record["image_thresholds"] == info["thresholds"]
    assert info["learned"] == plain.record["image_thresholds"]
    patches = sample_patches(tiny[1], FAST.patches, FAST.patch_size, FAST.seed)
    qnet = budgeted.qnet
    with torch.no_grad():
        qnet(patches)
    bits = qnet.sample_bits()
    assert float(bits.mean()) == pytest.approx(info["fab"]) and float(bits.mean()) <= 5.5
    assert [int((bits == b).sum()) for b in (4.0, 6.0, 8.0)] == info["classes"]
    reference = fp_outputs(qnet, patches)
    losses = class_losses(qnet, patches, reference)
    order = complexity(patches).argsort().tolist()
    count = len(order)
    costs = {}
    for low in range(count + 1):
        for high in range(count + 1 - low):
            if 6 + 2 * (high - low) / count <= 5.5:
                classes = [0] * low + [1] * (count - low - high) + [2] * high
                costs[low, high] = sum(float(losses[i, c]) for i, c in zip(order, classes,
                                                                           strict=True))
    best = min(costs, key=costs.__getitem__)
    assert (info["classes"][0], info["classes"][2]) == best
    assert info["l1"] == pytest.approx(costs[best] / count)
    again = fit_threshold_budget(apply_record(load_model(tiny[0]), plain.record), patches,
                                 reference, 5.5)
    assert list(again.thresholds) == info["thresholds"]
    assert info["learned"] == list(again.learned)


def test_threshold_pairs_turn_empty_classes_off() -> None:
    from compiler.quant.bitmap import COMPLEXITY_MAX
    from compiler.quant.granular import thresholds_for

    g = torch.tensor([1.0, 2.0, 4.0])
    assert thresholds_for(g, 0, 0) == (0.0, COMPLEXITY_MAX)
    assert thresholds_for(g, 1, 1) == (1.5, 3.0)
    assert thresholds_for(g, 2, 1) == (3.0, 3.0)
    assert thresholds_for(g, 3, 0) == (COMPLEXITY_MAX, COMPLEXITY_MAX)
    flat = torch.zeros(1, 3, 8, 8)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    sharp = checker.expand(1, 3, 8, 8).float()
    from compiler.quant.bitmap import complexity
    assert float(complexity(flat)) == 0.0 and float(complexity(sharp)) <= COMPLEXITY_MAX


def _cadyq_fab_after_training(tiny: tuple[Path, Path], bit_weight: float) -> tuple[float, float]:
    """CADyQ on the tiny EDSR with every selector started on its high candidate: the FAB on the
    calibration patches before and after training (joint schedule, no budget)."""
    from compiler.quant.calibrate import Calibrator
    from compiler.quant.patches import sample_patches

    config = replace(FAST, schedule="joint", bit_margin=0.0, bit_weight=bit_weight,
                     lr_selector=0.05)
    calibrator = Calibrator(load_model(tiny[0]), QuantSettings(method="cadyq", wbits=8, abits=6),
                            config)
    patches = sample_patches(tiny[1], config.patches, config.patch_size, config.seed)
    teacher, stats = calibrator.measure(patches)
    calibrator.initialize(teacher, stats)

    def fab() -> float:
        with torch.no_grad():
            calibrator.qnet(patches)
        return float(calibrator.qnet.sample_bits().mean())

    for _, conv in calibrator.qnet.qconvs():
        if conv.selector is not None:
            conv.selector.shift_(-3.0)  # 3 logits from the low candidate to the high one
    before = fab()
    calibrator.train(patches, teacher)
    return before, fab()


def test_cadyq_bit_loss_moves_the_fab_toward_the_base(tiny: tuple[Path, Path]) -> None:
    """Started mostly on the high candidate (FAB >= 7), the bit hinge pulls the average bits
    down toward the base 6; distillation alone keeps them up."""
    before, with_loss = _cadyq_fab_after_training(tiny, bit_weight=50.0)
    _, without = _cadyq_fab_after_training(tiny, bit_weight=0.0)
    assert before >= 7.0
    assert with_loss < before - 0.5 and with_loss < without
    assert with_loss >= 6.0 - 2.0


def test_cadyq_selects_a_candidate_per_patch_and_layer(tiny: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """Each adaptive layer picks base - 2 / base / base + 2 per sample; the FAB is their mean;
    busier content gets more bits; the budget holds the calibration FAB under base - margin;
    the record rebuilds the same network with the same choices."""
    from compiler.quant.patches import sample_patches

    config = replace(FAST, bit_margin=0.25)
    result = calibrate(load_model(tiny[0]), QuantSettings(method="cadyq", wbits=8, abits=6),
                       config, tiny[1])
    record, qnet = result.record, result.qnet
    vectors = record["bit_vectors"]  # the clustered configurations, by mean bits
    assert list(vectors) == ["-1", "0", "1"]
    assert all(len(v) == 4 and set(v) <= {4, 6, 8} for v in vectors.values())
    means = [sum(v) / 4 for v in vectors.values()]
    assert means == sorted(means) and means[0] < means[-1]
    selectors = [layer["selector"] for layer in record["layers"]]
    assert all(s is not None and s["candidates"] == [4, 6, 8] for s in selectors)
    assert len(record["calibration"]["validation_loss"]) == FAST.epochs + 1  # it trained
    patches = sample_patches(tiny[1], config.patches, config.patch_size, config.seed)
    with torch.no_grad():
        qnet(patches)
    assert float(qnet.sample_bits().mean()) <= 6 - 0.25
    flat = torch.full((1, 3, 12, 12), 0.5)
    noise = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    x = torch.cat([flat, noise, 0.5 + 0.2 * (noise - 0.5)])
    with torch.no_grad():
        out = qnet(x)
    chosen = torch.stack([conv.chosen_bits for _, conv in qnet.qconvs()
                          if conv.chosen_bits is not None])
    assert chosen.shape == (4, 3)
    assert set(chosen.flatten().tolist()) <= {4.0, 6.0, 8.0}
    assert torch.equal(qnet.sample_bits(), chosen.mean(dim=0))
    assert chosen[:, 0].mean() < chosen[:, 1].mean()  # flat patch: fewer bits than noise
    path = tmp_path / "cadyq.json"
    save_record(path, record)
    rebuilt = apply_record(load_model(tiny[0]), read_record(path))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)
    assert torch.equal(rebuilt.sample_bits(), qnet.sample_bits())


def test_cadyq_clips_and_bounds_train_with_the_selector_layers_at_the_base(
        tiny: tuple[Path, Path]) -> None:
    """Cyclic CADyQ training: the weight-clip and activation-bound epochs run every selector
    layer at the base, the selector epoch as the selectors pick; validation and the trained
    network are left to the selectors."""
    from compiler.quant.calibrate import Calibrator
    from compiler.quant.patches import sample_patches

    calibrator = Calibrator(load_model(tiny[0]), QuantSettings(method="cadyq", wbits=8, abits=6),
                            FAST)
    patches = sample_patches(tiny[1], FAST.patches, FAST.patch_size, FAST.seed)
    teacher, stats = calibrator.measure(patches)
    calibrator.initialize(teacher, stats)
    convs = [conv for _, conv in calibrator.qnet.qconvs() if conv.selector is not None]
    seen: list[tuple[bool, float | None]] = []
    handle = convs[0].register_forward_pre_hook(
        lambda conv, _inputs: seen.append((torch.is_grad_enabled(), conv.forced_bits)))
    try:
        calibrator.train(patches, teacher)
    finally:
        handle.remove()
    trained = [forced for grad, forced in seen if grad]  # 5 steps per epoch, 4 epochs
    assert trained == [6.0] * 10 + [None] * 5 + [6.0] * 5  # weight, act, selectors, weight
    assert {forced for grad, forced in seen if not grad} == {None}  # validations
    assert len(seen) == 20 + FAST.epochs + 1
    assert all(conv.forced_bits is None for conv in convs)


def test_cadyq_budget_of_a_margin_0_record_is_the_calibrated_one(tiny: tuple[Path, Path]) -> None:
    """Training does not depend on the margin: the budget applied to a ``--bit-margin 0`` record
    gives exactly the selectors of a calibration with that margin (benchmarks/bit_budget.py)."""
    from compiler.quant.granular import fp_outputs
    from compiler.quant.patches import sample_patches
    from compiler.quant.selector_budget import MIDDLE_PULLS, fit_selector_budget

    settings = QuantSettings(method="cadyq", wbits=8, abits=6)
    unbudgeted = calibrate(load_model(tiny[0]), settings, replace(FAST, bit_margin=0.0), tiny[1])
    budgeted = calibrate(load_model(tiny[0]), settings, replace(FAST, bit_margin=0.5), tiny[1])
    assert unbudgeted.record["calibration"]["selector_shift"] == 0.0
    assert unbudgeted.record["calibration"]["selector_budget"] is None
    qnet = apply_record(load_model(tiny[0]), unbudgeted.record)
    patches = sample_patches(tiny[1], FAST.patches, FAST.patch_size, FAST.seed)
    budget = fit_selector_budget(qnet, patches, fp_outputs(qnet, patches), 6 - 0.5)
    recorded = budgeted.record["calibration"]["selector_budget"]
    assert (budget.middle, budget.shift) == (recorded["middle"], recorded["shift"])
    assert budget.l1 == pytest.approx(recorded["l1"], rel=1e-5)
    assert budget.shift == budgeted.record["calibration"]["selector_shift"]
    # one (pull, shift) pair per pull, each at a calibration FAB <= the target; the least L1 kept
    assert [t[0] for t in budget.tried] == list(MIDDLE_PULLS)
    assert all(t[2] <= 5.5 for t in budget.tried)
    assert budget.l1 == min(t[3] for t in budget.tried)
    for (_, mine), (_, theirs) in zip(qnet.qconvs(), budgeted.qnet.qconvs(), strict=True):
        assert mine.selector is not None and theirs.selector is not None
        assert torch.equal(mine.selector.linear.bias, theirs.selector.linear.bias)


def test_cadyq_budget_holds_the_networks_own_fab(tiny: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-feature search misses what shifting earlier layers does to later layers'
    features; every settled pair's own FAB (a plain forward pass) is <= the target, where
    unsettled pairs overshot some targets."""
    from compiler.quant import selector_budget
    from compiler.quant.granular import fp_outputs
    from compiler.quant.patches import sample_patches

    settings = QuantSettings(method="cadyq", wbits=8, abits=6)
    record = calibrate(load_model(tiny[0]), settings, replace(FAST, bit_margin=0.0),
                       tiny[1]).record
    patches = sample_patches(tiny[1], FAST.patches, FAST.patch_size, FAST.seed)

    def budgeted(target: float) -> tuple[float, selector_budget.SelectorBudget]:
        qnet = apply_record(load_model(tiny[0]), record)
        budget = selector_budget.fit_selector_budget(qnet, patches, fp_outputs(qnet, patches),
                                                     target)
        with torch.no_grad():
            qnet(patches)
        return float(qnet.sample_bits().mean()), budget

    targets = (4.5, 4.75, 5.0, 5.25, 5.5, 5.75, 6.0, 6.25, 6.5, 6.75, 7.0, 7.25, 7.5)
    for target in targets:
        fab, budget = budgeted(target)
        assert fab == pytest.approx(budget.fab) and fab <= target + 1e-6
        assert all(t[2] <= target + 1e-6 for t in budget.tried)
        assert budget.l1 == min(t[3] for t in budget.tried)
    monkeypatch.setattr(selector_budget, "_settle", lambda *_args: 0.0)
    assert sum(budgeted(target)[0] > target + 1e-6 for target in targets) >= 2


@pytest.mark.parametrize(("abits", "mode", "trained"), [
    (4, "auto", False), (6, "auto", True), (4, "on", True), (6, "off", False)])
def test_layer_offset_modes(tiny: tuple[Path, Path], abits: int, mode: str,
                            trained: bool) -> None:
    """AdaBM's layer offsets: off (auto at a base of <= 4 bits) keeps every layer at the base and
    moves the bit margin to the image thresholds; on starts them from the input-std percentiles
    and the budget lowers layers."""
    weights, calib = tiny
    config = replace(FAST, steps=0, layer_offsets=mode, bit_margin=0.25)
    record = calibrate(load_model(weights), QuantSettings(wbits=8, abits=abits), config,
                       calib).record
    info = record["calibration"]
    d_layer = [b - abits for b in record["bit_vectors"]["0"]]
    if trained:
        assert len(set(d_layer)) > 1 and sum(d_layer) <= -0.25 * len(d_layer)
        assert info["budget_lowered"] and "threshold_budget" not in info
    else:
        assert d_layer == [0] * len(d_layer) and info["budget_lowered"] == []
        assert info["threshold_budget"]["fab"] <= abits - 0.25
        assert record["image_thresholds"] == info["threshold_budget"]["thresholds"]
    with pytest.raises(ConfigError, match="layer offsets mode"):
        CalibrationConfig(layer_offsets="sometimes")


def test_threshold_budget_counts_the_layer_offsets(tiny: tuple[Path, Path]) -> None:
    """On an AdaBM network with layer offsets the threshold budget's FAB is the base plus their
    mean plus the image classes', and that is what the network runs at on the patches."""
    from compiler.quant.granular import fit_threshold_budget, fp_outputs
    from compiler.quant.patches import sample_patches

    config = replace(FAST, steps=0, layer_offsets="on", bit_margin=0.0)
    result = calibrate(load_model(tiny[0]), QuantSettings(wbits=8, abits=6), config, tiny[1])
    offsets = result.qnet.layer_to_bit.hard()
    assert len(set(offsets)) > 1
    patches = sample_patches(tiny[1], FAST.patches, FAST.patch_size, FAST.seed)
    target = 6 + sum(offsets) / len(offsets) - 0.3
    budget = fit_threshold_budget(result.qnet, patches, fp_outputs(result.qnet, patches), target)
    with torch.no_grad():
        result.qnet(patches)
    fab = float(result.qnet.sample_bits().mean())
    assert fab == pytest.approx(budget.fab) and fab <= target + 1e-9
    low, _, high = budget.classes
    assert fab == pytest.approx(6 + sum(offsets) / len(offsets) + (high - low) / len(patches))


@pytest.mark.parametrize(("method", "margin", "expected"), [
    ("adabm", None, 0.15), ("granular", None, 0.15), ("cadyq", None, 0.0), ("cadyq", 0.3, 0.3)])
def test_bit_margin_defaults_per_method(tiny: tuple[Path, Path], method: str,
                                        margin: float | None, expected: float) -> None:
    """The margin is 0.15 by default, and 0 for CADyQ, whose budget then holds the base."""
    settings = QuantSettings(method=method, wbits=8, abits=6)
    calibrator = Calibrator(load_model(tiny[0]), settings, replace(FAST, bit_margin=margin))
    assert calibrator.bit_margin == expected


def test_cadyq_is_budgeted_to_the_base_by_default(tiny: tuple[Path, Path]) -> None:
    """By default CADyQ's budget runs with a target of the base (an explicit 0 skips it)."""
    settings = QuantSettings(method="cadyq", wbits=8, abits=6)
    info = calibrate(load_model(tiny[0]), settings, FAST, tiny[1]).record["calibration"]
    assert info["bit_margin"] == 0.0 and info["config"]["bit_margin"] is None
    assert info["selector_budget"]["target"] == 6.0
    assert info["selector_budget"]["fab"] <= 6.0

"""The calibration's stabilizers: parameter averaging and held-out validation patches."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from compiler.quant.averaging import ParameterAverage, averaged_steps
from compiler.quant.calibrate import (
    AVERAGED_GROUPS,
    CalibrationConfig,
    Calibrator,
    _BlockRecorder,
    calibrate,
)
from compiler.quant.patches import sample_patches
from compiler.quant.qmodel import QuantSettings
from compiler.zoo import load_model
from runtime.errors import ConfigError

FAST = CalibrationConfig(patches=8, patch_size=16, steps=20, batch=2, epochs=4, validation=4)
W4A4 = QuantSettings(method="adabm", wbits=4, abits=4)


def test_parameter_average_is_the_mean_of_the_offered_states() -> None:
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor(10.0))
    average = ParameterAverage([a, b])
    assert [t.tolist() for t in average.mean()] == [[1.0, 2.0], 10.0]  # nothing offered yet
    for shift in (0.0, 1.0, 5.0):
        with torch.no_grad():
            a.copy_(torch.tensor([1.0, 2.0]) + shift)
            b.fill_(10.0 - shift)
        average.update()
    average.apply()
    assert average.count == 3
    assert a.tolist() == [3.0, 4.0] and b.item() == 8.0
    assert a.dtype == torch.float32 and average.sums[0].dtype == torch.float64


def test_averaged_steps() -> None:
    assert [averaged_steps(50, f) for f in (0.0, 0.5, 0.25, 1.0)] == [0, 25, 12, 50]
    assert averaged_steps(3, 1.0) == 3


@pytest.mark.parametrize(("field", "value"), [("holdout", 1), ("holdout", -2),
                                              ("average", 1.5), ("average", -0.1)])
def test_bad_stabilizer_settings_are_refused(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match="held-out|averaged"):
        CalibrationConfig(**{field: value})  # type: ignore[arg-type]


class _Recording(ParameterAverage):
    """Keeps every state it is offered, to check the mean it applies."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params)
        self.states: list[list[torch.Tensor]] = []

    def update(self) -> None:
        super().update()
        self.states.append([p.detach().clone() for p in self.params])


def test_an_averaged_epoch_ends_at_the_mean_of_its_last_steps(tiny: tuple[Path, Path]) -> None:
    config = replace(FAST, average=0.5)
    calibrator = Calibrator(load_model(tiny[0]), W4A4, config)
    patches = sample_patches(tiny[1], config.patches, config.patch_size, config.seed)
    teacher, stats = calibrator.measure(patches)
    calibrator.initialize(teacher, stats)
    groups = calibrator._param_groups()
    params = [p for key in AVERAGED_GROUPS for p in groups[key]]
    optimizer = torch.optim.Adam(params, lr=0.01)
    recorder = _BlockRecorder(calibrator.qnet.model, calibrator.blocks)
    average = _Recording(params)
    try:
        calibrator._epoch(patches, teacher, recorder, [optimizer], 6, False, average=average)
    finally:
        recorder.close()
    assert len(average.states) == 3  # the last half of 6 steps
    assert not torch.equal(average.states[0][0], average.states[-1][0])  # they did move
    for index, param in enumerate(params):
        mean = torch.stack([s[index].double() for s in average.states]).mean(dim=0)
        # the weight clips may be bounded again after the mean; the activation bounds are not
        assert torch.allclose(param.double(), mean, atol=1e-6), index


def test_held_out_patches_validate_and_are_never_trained_on(tiny: tuple[Path, Path]) -> None:
    weights, calib = tiny
    config = replace(FAST, holdout=4, average=0.5)
    calibrator = Calibrator(load_model(weights), W4A4, config)
    record = calibrator.run(calib).record
    crops = sample_patches(calib, config.patches + config.holdout, config.patch_size, config.seed)
    val = calibrator._validation
    assert val is not None and val.held_out
    assert torch.equal(val.patches, crops[config.patches:])  # the crops after the trained ones
    # the trained crops are those of a run without held-out patches
    assert torch.equal(crops[:config.patches],
                       sample_patches(calib, config.patches, config.patch_size, config.seed))
    fp = load_model(weights).model.eval()
    with torch.no_grad():
        assert torch.allclose(val.teacher.outputs, fp(val.patches), atol=1e-5)
    info = record["calibration"]
    assert info["validation_patches"] == 4 and info["validation_held_out"] is True
    assert info["config"]["holdout"] == 4 and info["config"]["average"] == 0.5
    assert len(info["validation_loss"]) == config.epochs + 1
    assert info["validation_loss"][info["best_epoch"]] == min(info["validation_loss"])
    plain = calibrate(load_model(weights), W4A4, FAST, calib).record["calibration"]
    assert plain["validation_patches"] == FAST.validation
    assert plain["validation_held_out"] is False


@pytest.mark.parametrize(("method", "abits", "given", "fraction"), [
    ("adabm", 4, None, 0.5), ("granular", 4, None, 0.5), ("cadyq", 4, None, 0.5),
    ("adabm", 6, None, 0.0), ("ddtb", 4, None, 0.0), ("adabm", 4, 0.0, 0.0),
    ("adabm", 6, 0.25, 0.25)])
def test_averaging_is_on_by_default_for_adaptive_bits_at_a_4_bit_base(
        tiny: tuple[Path, Path], method: str, abits: int, given: float | None,
        fraction: float) -> None:
    """``average`` None (the default) averages the last half of each epoch for the bit-adaptive
    methods at a base of <= 4 bits; a given value is kept; the record says which it used."""
    settings = QuantSettings(method=method, wbits=8 if abits > 4 else 4, abits=abits)
    calibrator = Calibrator(load_model(tiny[0]), settings, replace(FAST, average=given))
    assert calibrator.averaged_fraction == fraction
    if method == "adabm" and given is None and abits == 4:
        info = calibrator.run(tiny[1]).record["calibration"]
        assert info["averaged_fraction"] == 0.5 and info["config"]["average"] is None

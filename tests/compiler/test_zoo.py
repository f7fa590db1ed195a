"""The model zoo: real checkpoints reach their published Set5 PSNR, synthetic checkpoints of every
architecture and key layout round-trip through detection, broken files fail with clear errors,
and the quantization name lists cover every conv."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from compiler.zoo import ARCHS, SRNet, load_model, load_state_dict_file
from compiler.zoo.carn import CARN, CascadingBlock
from compiler.zoo.common import MeanShift
from compiler.zoo.edsr import EDSR
from compiler.zoo.edsr import ResBlock as EDSRBlock
from compiler.zoo.imdn import IMDN, IMDModule
from compiler.zoo.rdn import RDB, RDN
from compiler.zoo.rfdn import RFDB, RFDN
from compiler.zoo.srresnet import ResBlock as SRResNetBlock
from compiler.zoo.srresnet import SRResNet
from runtime.errors import CheckpointError

SharedFile = Callable[[str], Path]

# ------------------------------------------------------------------ real checkpoints and Set5


def _y(rgb: np.ndarray) -> np.ndarray:
    a = rgb.astype(np.float64)
    return 16 + (65.738 * a[..., 0] + 129.057 * a[..., 1] + 25.064 * a[..., 2]) / 256


def _set5_psnr(shared_file: SharedFile, model: SRNet, scale: int, name: str) -> float:
    """Y-PSNR on one Set5 image: MATLAB-bicubic LR, uint8 output, HR mod-cropped, border=scale."""
    lr_path = shared_file(f"benchmarks/Set5/LR_bicubic/X{scale}/{name}x{scale}.png")
    lr = np.asarray(Image.open(lr_path).convert("RGB"))
    hr = np.asarray(Image.open(shared_file(f"benchmarks/Set5/HR/{name}.png")).convert("RGB"))
    hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]
    x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        out = model(x)[0]
    sr = (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert sr.shape == hr.shape
    diff = (_y(sr) - _y(hr))[scale:-scale, scale:-scale]
    return float(10 * np.log10(255.0**2 / np.mean(diff**2)))


IMDN_CONFIG = (("nf", 64), ("num_modules", 6))
CARN_M_CONFIG = (("n_feats", 64), ("group", 4), ("multi_scale", 1))
EDSR8_CONFIG = (("n_resblocks", 8), ("n_feats", 64), ("res_scale", 1.0), ("rgb_range", 255.0))

# file, scale asked, arch, config, detected scale, measured Y-PSNR per image (CARN-M's grouped
# convs are slow on a CPU: one image each). Over all
# of Set5 these checkpoints give IMDN 37.996 / 34.360 / 32.210, CARN-M 37.678 / 34.058 / 31.883
# and EDSR-8 37.801 dB (papers and the data README: 38.00 / 34.36 / 32.21, 37.68 / 34.06 / 31.89,
# 37.81).
REAL = [
    ("imdn_x2.pth", None, "IMDN", IMDN_CONFIG, 2, {"butterfly": 35.3586}),
    ("imdn_x3.pth", None, "IMDN", IMDN_CONFIG, 3, {"butterfly": 30.8876, "bird": 38.1753}),
    ("imdn_x4.pth", 4, "IMDN", IMDN_CONFIG, 4, {"butterfly": 28.5594, "bird": 35.0441}),
    ("carn_m_multiscale.pth", 2, "CARN-M", CARN_M_CONFIG, 2, {"butterfly": 34.5945}),
    ("carn_m_multiscale.pth", 3, "CARN-M", CARN_M_CONFIG, 3, {"bird": 37.5303}),
    ("carn_m_multiscale.pth", 4, "CARN-M", CARN_M_CONFIG, 4, {"butterfly": 27.9879}),
    ("edsr_r8f64_x2_krasserm.pt", None, "EDSR", EDSR8_CONFIG, 2,
     {"butterfly": 34.8360, "bird": 43.0048}),
]


@pytest.mark.parametrize(("file", "scale", "arch", "config", "detected", "psnr"), REAL,
                         ids=[f"{r[0]}-x{r[4]}" for r in REAL])
def test_real_checkpoint_detected_and_exact(
    shared_file: SharedFile, file: str, scale: int | None, arch: str,
    config: tuple[tuple[str, float], ...], detected: int, psnr: dict[str, float],
) -> None:
    loaded = load_model(shared_file(f"weights/{file}"), scale)
    info = loaded.info
    assert (info.arch, info.scale, info.config) == (arch, detected, config)
    assert loaded.model.scale == detected and not loaded.model.training
    assert info.path.name == file and len(info.sha256) == 64
    measured = {name: _set5_psnr(shared_file, loaded.model, detected, name) for name in psnr}
    assert measured == pytest.approx(psnr, abs=0.01)


def test_real_checkpoint_checksum(shared_file: SharedFile) -> None:
    info = load_model(shared_file("weights/edsr_r8f64_x2_krasserm.pt")).info
    assert info.sha256 == "80cdece5a97d064bc25eb3563bb9eaefec958b2acdc92338f30b0d42d52326bf"
    assert info.describe() == "EDSR x2 (n_resblocks=8, n_feats=64, res_scale=1.0, rgb_range=255.0)"


def test_multiscale_checkpoint_keeps_only_the_chosen_branch(shared_file: SharedFile) -> None:
    model = load_model(shared_file("weights/carn_m_multiscale.pth"), 3).model
    branches = [name for name, _ in model.get_submodule("upsample").named_children()]
    assert branches == ["up3"]
    out = model(torch.rand(1, 3, 10, 12))
    assert out.shape == (1, 3, 30, 36)


# ------------------------------------------------------------------------- synthetic models


def _randomize(model: SRNet) -> SRNet:
    """Give BatchNorm statistics and PReLU slopes non-default values, so loading must move them."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo in ((m.running_mean, -0.2), (m.running_var, 0.5), (m.weight, 0.5),
                              (m.bias, -0.2)):
                    assert t is not None
                    t.copy_(torch.rand(t.shape, generator=gen) * 0.4 + lo)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.3)
    return model.eval()


SYNTHETIC: dict[str, tuple[Callable[[], SRNet], str, tuple[tuple[str, float], ...]]] = {
    "edsr-x3": (lambda: EDSR(2, 8, 3), "EDSR",
                (("n_resblocks", 2), ("n_feats", 8), ("res_scale", 1.0), ("rgb_range", 255.0))),
    "edsr-x4": (lambda: EDSR(2, 8, 4), "EDSR",
                (("n_resblocks", 2), ("n_feats", 8), ("res_scale", 1.0), ("rgb_range", 255.0))),
    "edsr-x8-range1": (lambda: EDSR(1, 8, 8, rgb_range=1.0), "EDSR",
                       (("n_resblocks", 1), ("n_feats", 8), ("res_scale", 1.0),
                        ("rgb_range", 1.0))),
    "edsr-full-style": (lambda: EDSR(2, 256, 2, res_scale=0.1), "EDSR",
                        (("n_resblocks", 2), ("n_feats", 256), ("res_scale", 0.1),
                         ("rgb_range", 255.0))),
    "srresnet-adabm-x4": (lambda: SRResNet(2, 16, 4), "SRResNet",
                          (("n_resblocks", 2), ("n_feats", 16), ("bn", 1), ("block_bias", 0),
                           ("block_prelu", 1), ("outer_bias", 0), ("mean_shift", 0),
                           ("rgb_range", 255.0))),
    "srresnet-daq-x2": (lambda: SRResNet(3, 8, 2, block_prelu=False, mean_shift=True), "SRResNet",
                        (("n_resblocks", 3), ("n_feats", 8), ("bn", 1), ("block_bias", 0),
                         ("block_prelu", 0), ("outer_bias", 0), ("mean_shift", 1),
                         ("rgb_range", 255.0))),
    "srresnet-oaq-x3": (lambda: SRResNet(2, 8, 3, block_bias=True), "SRResNet",
                        (("n_resblocks", 2), ("n_feats", 8), ("bn", 1), ("block_bias", 1),
                         ("block_prelu", 1), ("outer_bias", 0), ("mean_shift", 0),
                         ("rgb_range", 255.0))),
    "rdn-x2": (lambda: RDN(2, 16, 3, 2, 8), "RDN",
               (("G0", 16), ("D", 3), ("C", 2), ("G", 8), ("kernel_size", 3),
                ("rgb_range", 255.0))),
    "rdn-x4": (lambda: RDN(4, 8, 2, 3, 4), "RDN",
               (("G0", 8), ("D", 2), ("C", 3), ("G", 4), ("kernel_size", 3),
                ("rgb_range", 255.0))),
    "carn-up-x2": (lambda: CARN(2, 16, layout="up"), "CARN",
                   (("n_feats", 16), ("group", 1), ("multi_scale", 0))),
    "carn-body-x3": (lambda: CARN(3, 16, layout="body"), "CARN",
                     (("n_feats", 16), ("group", 1), ("multi_scale", 0))),
    "carn-up4-only": (lambda: CARN(4, 16, layout="branches", branch_scales=(4,)), "CARN",
                      (("n_feats", 16), ("group", 1), ("multi_scale", 0))),
    "carn-m-up-x4": (lambda: CARN(4, 16, 4, efficient=True, layout="up"), "CARN-M",
                     (("n_feats", 16), ("group", 4), ("multi_scale", 0))),
    "imdn-x2": (lambda: IMDN(2, 16, 3), "IMDN", (("nf", 16), ("num_modules", 3))),
    "imdn-x3": (lambda: IMDN(3, 32, 2), "IMDN", (("nf", 32), ("num_modules", 2))),
    "rfdn-x4": (lambda: RFDN(4, 16, 2), "RFDN", (("nf", 16), ("num_modules", 2))),
    "rfdn-x2": (lambda: RFDN(2, 12, 4), "RFDN", (("nf", 12), ("num_modules", 4))),
}


@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_synthetic_round_trip(tmp_path: Path, case: str) -> None:
    factory, arch, config = SYNTHETIC[case]
    torch.manual_seed(0)
    original = _randomize(factory())
    path = tmp_path / "model.pt"
    torch.save(original.state_dict(), path)
    loaded = load_model(path)
    assert (loaded.info.arch, loaded.info.scale, loaded.info.config) == (
        arch, original.scale, config)
    assert type(loaded.model) is type(original)
    x = torch.rand(1, 3, 16, 18)
    with torch.no_grad():
        expected, got = original(x), loaded.model(x)
    assert got.shape == (1, 3, 16 * original.scale, 18 * original.scale)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("efficient", [False, True], ids=["carn", "carn-m"])
def test_synthetic_multiscale_carn(tmp_path: Path, efficient: bool) -> None:
    torch.manual_seed(0)
    full = CARN(2, 16, 4 if efficient else 1, efficient, "branches", (2, 3, 4)).eval()
    path = tmp_path / "multi.pth"
    torch.save(full.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"multi-scale .*x2, x3, x4.*give the scale"):
        load_model(path)
    x = torch.rand(1, 3, 12, 12)
    for scale in (2, 3, 4):
        loaded = load_model(path, scale)
        assert loaded.info.arch == ("CARN-M" if efficient else "CARN")
        assert dict(loaded.info.config)["multi_scale"] == 1
        full.scale, full.up_path = scale, f"upsample.up{scale}"
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), full(x), rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"x8 is not available.*x2, x3, x4"):
        load_model(path, 8)


WRAPS: dict[str, Callable[[dict[str, torch.Tensor]], object]] = {
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 7},
    "model": lambda sd: {"model": sd},
    "params": lambda sd: {"params": sd, "params_ema": sd},
    "module-prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "nested-module-prefix": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_wrapped_checkpoints(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(0)
    original = EDSR(2, 8, 2).eval()
    path = tmp_path / "wrapped.pth"
    torch.save(WRAPS[wrap](original.state_dict()), path)
    assert set(load_state_dict_file(path)) == set(original.state_dict())
    loaded = load_model(path)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), original(x), rtol=0, atol=1e-6)


def test_half_precision_checkpoint_loads_as_float32(tmp_path: Path) -> None:
    original = IMDN(2, 16, 2).eval()
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in original.state_dict().items()}, path)
    model = load_model(path).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original.half().float()(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_model(tmp_path / "nope.pth")


@pytest.mark.parametrize("file", ["imdn_x2.pth", "edsr_r8f64_x2_krasserm.pt"])
def test_truncated_file(shared_file: SharedFile, tmp_path: Path, file: str) -> None:
    data = shared_file(f"weights/{file}").read_bytes()
    path = tmp_path / file
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*{file}: the file is "
                                              "truncated or corrupt") as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(("content", "why"), [
    (b"weights: see https://example.org\nnot a checkpoint\n", "it is a text file"),
    (b"", "the file is empty"),
    (bytes(range(7, 256)) * 4, "not a PyTorch checkpoint"),
])
def test_not_a_checkpoint(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=why):
        load_model(path)


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a file"):
        load_model(tmp_path)


def test_missing_key_names_architecture_and_key(tmp_path: Path) -> None:
    sd = EDSR(3, 8, 2).state_dict()
    del sd["body.1.body.2.bias"]
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"closest is EDSR \(n_resblocks=3, n_feats=8.*"
                                              r"missing keys body\.1\.body\.2\.bias; "
                                              r"unexpected keys \(none\)"):
        load_model(path)


def test_real_checkpoint_with_a_key_renamed(shared_file: SharedFile, tmp_path: Path) -> None:
    sd = load_state_dict_file(shared_file("weights/imdn_x4.pth"))
    sd["IMDB3.cca.conv_du.0.weight_extra"] = sd.pop("IMDB3.cca.conv_du.0.weight")
    path = tmp_path / "imdn.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"closest is IMDN .*missing keys "
                                              r"IMDB3\.cca\.conv_du\.0\.weight; unexpected keys "
                                              r"IMDB3\.cca\.conv_du\.0\.weight_extra"):
        load_model(path)


def test_shape_mismatch(tmp_path: Path) -> None:
    sd = EDSR(2, 8, 2).state_dict()
    sd["body.1.body.0.weight"] = torch.zeros(8, 8, 5, 5)
    path = tmp_path / "odd.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"keys are those of EDSR .*shapes differ: size "
                                              r"mismatch for body\.1\.body\.0\.weight"):
        load_model(path)


def test_random_dict(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    torch.save({"encoder.weight": torch.zeros(3), "decoder.bias": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="matches no known architecture") as info:
        load_model(path)
    message = str(info.value)
    assert all(arch in message for arch in ARCHS) and "encoder.weight" in message


def test_dict_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="holds no state dict: non-tensor entries epoch, lr"):
        load_model(path)


def test_unavailable_scale(shared_file: SharedFile) -> None:
    with pytest.raises(CheckpointError, match=r"x3 is not available; this IMDN checkpoint has x2"):
        load_model(shared_file("weights/imdn_x2.pth"), 3)


# ------------------------------------------------------------------ quantization name lists

BLOCK_TYPES: dict[str, type[nn.Module]] = {
    "EDSR": EDSRBlock, "SRResNet": SRResNetBlock, "RDN": RDB, "CARN": CascadingBlock,
    "CARN-M": CascadingBlock, "IMDN": IMDModule, "RFDN": RFDB,
}
EXCEPTIONS = {"IMDN": ".cca.", "RFDN": ".esa."}
"""Convs in neither list: IMDN's channel attention and RFDN's spatial attention branches."""


def _check_lists(model: SRNet, expected_blocks: int) -> None:
    adaptive, fixed, blocks = model.adaptive_convs(), model.fixed_convs(), model.feature_blocks()
    for name in adaptive + fixed:
        module = model.get_submodule(name)
        assert isinstance(module, nn.Conv2d) and not isinstance(module, MeanShift), name
    assert len(set(adaptive)) == len(adaptive) and len(set(fixed)) == len(fixed)
    assert not set(adaptive) & set(fixed)
    assert len(blocks) == expected_blocks
    assert all(isinstance(model.get_submodule(b), BLOCK_TYPES[model.arch]) for b in blocks)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    shifts = {n for n in convs if isinstance(model.get_submodule(n), MeanShift)}
    skipped = {n for n in convs if model.arch in EXCEPTIONS and EXCEPTIONS[model.arch] in n}
    assert set(adaptive) | set(fixed) | shifts | skipped == convs
    assert not (set(adaptive) | set(fixed)) & skipped
    ends = model.trunk_ends()  # the image conv, then the conv closing the global residual
    assert set(ends) <= set(fixed) and 1 <= len(ends) <= 2
    first = model.get_submodule(ends[0])
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    if len(ends) == 2:
        last = model.get_submodule(ends[1])
        assert isinstance(last, nn.Conv2d) and last.out_channels == first.out_channels


def test_real_checkpoint_name_lists(shared_file: SharedFile) -> None:
    imdn = load_model(shared_file("weights/imdn_x3.pth")).model
    _check_lists(imdn, 6)
    assert len(imdn.adaptive_convs()) == 30 and imdn.fixed_convs() == [
        "fea_conv", "c.0", "LR_conv", "upsampler.0"]
    carn_m = load_model(shared_file("weights/carn_m_multiscale.pth"), 4).model
    _check_lists(carn_m, 3)
    assert len(carn_m.adaptive_convs()) == 3 * (3 + 3) + 3
    assert carn_m.fixed_convs() == ["entry", "upsample.up4.body.0", "upsample.up4.body.3", "exit"]
    edsr = load_model(shared_file("weights/edsr_r8f64_x2_krasserm.pt")).model
    _check_lists(edsr, 8)
    assert edsr.fixed_convs() == ["head.0", "body.8", "tail.0.0", "tail.1"]


@pytest.mark.parametrize("case", sorted(SYNTHETIC))
def test_synthetic_name_lists(case: str) -> None:
    model = SYNTHETIC[case][0]()
    count = {"EDSR": "n_resblocks", "SRResNet": "n_resblocks", "RDN": "D", "IMDN": "num_modules",
             "RFDN": "num_modules"}
    config = dict(SYNTHETIC[case][2])
    _check_lists(model, int(config[count[model.arch]]) if model.arch in count else 3)

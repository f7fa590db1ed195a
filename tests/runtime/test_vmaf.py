"""VMAF NEG through the imageio-ffmpeg wheel's libvmaf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.errors import MediaError
from runtime.vmaf import video_scores, vmaf_neg


def _frames(seed: int, count: int = 3, shape: tuple[int, int] = (64, 80)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (shape[0] // 8, shape[1] // 8, 3)).astype(np.uint8)
    smooth = base.repeat(8, 0).repeat(8, 1)  # blocks: content VMAF can see
    return [np.roll(smooth, i, axis=1) for i in range(count)]


def test_vmaf_neg_scores_distortion_lower() -> None:
    reference = _frames(0)
    same, per_frame = vmaf_neg(reference, reference)
    assert same > 95 and len(per_frame) == 3
    noise = np.random.default_rng(1)
    noisy = [np.clip(f.astype(int) + noise.integers(-40, 41, f.shape), 0, 255).astype(np.uint8)
             for f in reference]
    worse, _ = vmaf_neg(noisy, reference)
    assert worse < same - 10


def test_vmaf_neg_refuses_mismatches() -> None:
    with pytest.raises(MediaError, match="as many frames of one size"):
        vmaf_neg(_frames(0, 2), _frames(0, 3))
    with pytest.raises(MediaError, match="at least one frame"):
        vmaf_neg([], [])
    with pytest.raises(MediaError, match="H x W x 3 uint8"):
        vmaf_neg([np.zeros((8, 8), dtype=np.uint8)], [np.zeros((8, 8), dtype=np.uint8)])


def test_video_scores(tmp_path: Path) -> None:
    from runtime.video import EncoderSettings, VideoWriter

    frames = _frames(2, 4)
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, 25, settings=EncoderSettings(crf=0)) as writer:
        for frame in frames:
            writer.write(frame)
    scores = video_scores(path, path, limit=3)
    assert scores["scored_frames"] == 3 and scores["vmaf_neg"] > 95
    assert scores["psnr_y"] > 60

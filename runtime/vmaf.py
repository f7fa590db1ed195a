"""VMAF with the NEG model ("no enhancement gain": plain VMAF rewards over-sharpening) through
the ffmpeg binary of the ``imageio-ffmpeg`` wheel, which is built with libvmaf.

:func:`vmaf_neg` writes both frame sequences as raw RGB into a temporary folder, runs
``ffmpeg ... -lavfi libvmaf=model=version=vmaf_v0.6.1neg`` and returns the mean score (0..100)
and the per-frame scores from its JSON log.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, MediaError

__all__ = ["MODEL", "ffmpeg_path", "video_scores", "vmaf_neg"]

MODEL = "vmaf_v0.6.1neg"
_Frame = npt.NDArray[np.uint8]


def ffmpeg_path() -> str:
    """The ffmpeg of the ``imageio-ffmpeg`` wheel (ConfigError naming the package if absent)."""
    try:
        import imageio_ffmpeg
    except ImportError as err:
        raise ConfigError("VMAF needs the imageio-ffmpeg package (its ffmpeg has libvmaf): "
                          "pip install imageio-ffmpeg") from err
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def _write_raw(frames: Iterable[_Frame], path: Path) -> tuple[int, int, int]:
    """Write H x W x 3 uint8 frames back to back; (count, height, width)."""
    count, shape = 0, None
    with path.open("wb") as out:
        for frame in frames:
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise MediaError(f"VMAF frames must be H x W x 3 uint8, got {frame.shape} "
                                 f"{frame.dtype}")
            if shape is not None and frame.shape != shape:
                raise MediaError(f"VMAF frames must all have one size: {frame.shape} after "
                                 f"{shape}")
            shape = frame.shape
            out.write(np.ascontiguousarray(frame).tobytes())
            count += 1
    if shape is None:
        raise MediaError("VMAF needs at least one frame")
    return count, shape[0], shape[1]


def vmaf_neg(distorted: Iterable[_Frame], reference: Iterable[_Frame], *,
             threads: int = 2) -> tuple[float, list[float]]:
    """(mean VMAF NEG, per-frame scores) of ``distorted`` against ``reference`` (same sizes)."""
    with tempfile.TemporaryDirectory(prefix="adasr-vmaf-") as folder:
        root = Path(folder)
        first = _write_raw(distorted, root / "distorted.rgb")
        second = _write_raw(reference, root / "reference.rgb")
        if first != second:
            raise MediaError(f"VMAF needs as many frames of one size on both sides: "
                             f"{first} vs {second} (frames, height, width)")
        _, height, width = first
        raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", "25"]
        log = root / "vmaf.json"
        command = [ffmpeg_path(), "-hide_banner", "-nostdin", "-loglevel", "error",
                   *raw, "-i", str(root / "distorted.rgb"), *raw, "-i", str(root / "reference.rgb"),
                   "-lavfi", f"[0:v]format=yuv420p[d];[1:v]format=yuv420p[r];[d][r]libvmaf="
                   f"model=version={MODEL}:log_fmt=json:log_path={log}:n_threads={threads}",
                   "-f", "null", "-"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not log.is_file():
            raise MediaError(f"ffmpeg libvmaf failed ({done.returncode}): "
                             f"{done.stderr.strip().splitlines()[-1:] or 'no output'}")
        data = json.loads(log.read_text())
    scores = [float(frame["metrics"]["vmaf"]) for frame in data["frames"]]
    return float(data["pooled_metrics"]["vmaf"]["mean"]), scores


def video_scores(output: Path, reference: Path, *, limit: int | None = None,
                 threads: int = 2) -> dict[str, float | int]:
    """VMAF NEG and mean Y-PSNR (shave = 0) of the video ``output`` against ``reference`` (the
    original frames at the output size), over their first ``limit`` frames (both decoded)."""
    from runtime.metrics import psnr_y
    from runtime.video import read_frames

    produced = list(read_frames(output, limit=limit))
    original = list(read_frames(reference, limit=len(produced)))
    if not produced:
        raise MediaError(f"{output} has no frames to score")
    if len(original) != len(produced) or original[0].shape != produced[0].shape:
        size = original[0].shape[:2] if original else None
        raise MediaError(f"--reference {reference} must have at least the {len(produced)} "
                         f"frames of the output at its size {produced[0].shape[:2]}, got "
                         f"{len(original)} frames of {size}")
    score, _ = vmaf_neg(produced, original, threads=threads)
    psnr = [psnr_y(a, b, 0) for a, b in zip(produced, original, strict=True)]
    return {"vmaf_neg": round(score, 4), "psnr_y": round(float(np.mean(psnr)), 4),
            "scored_frames": len(produced)}

"""PNG plots of a profile (matplotlib, imported here only, drawn without pyplot or a display).

* ``latency.png`` -- ms per tile (median / batch) per engine, ordered by FAB, one bar per
  (tile, batch, threads) configuration at the bundle's tile, p10-p90 whiskers.
* ``pareto.png`` -- PSNR against ms per frame (:data:`~profiles.schema.PARETO_UNIT`): the static
  engines, their front as a staircase, the adaptive dispatcher highlighted.
* ``layers.png`` -- the top per-layer times of each engine (bundle's tile, first batch).
* ``video.png`` (profiles with a video measurement) -- VMAF NEG and Y-PSNR against ms per clip
  frame, one point per policy (every rung and the adaptive one).

Each file is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from profiles.layers import OTHER
from profiles.pareto import Point, pareto_front
from profiles.report import reference_entries
from profiles.schema import Profile, VideoQuality
from runtime.fileio import atomic_write_bytes

__all__ = ["PLOTS", "write_plots"]

PLOTS = {"latency": "latency.png", "pareto": "pareto.png", "layers": "layers.png",
         "video": "video.png"}
DPI = 120


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _fab_order(profile: Profile) -> list[str]:
    fabs = {e.name: e.fab for e in profile.engines}
    return sorted(fabs, key=lambda name: (fabs[name], name))


def plot_latency(profile: Profile, path: Path) -> Path:
    entries = reference_entries(profile)
    names = _fab_order(profile)
    configs = sorted({(e.batch, e.threads) for e in entries})
    fig = _figure(max(5.0, 1.2 * len(names) * max(1, len(configs)) ** 0.5 + 2), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(configs)
    for k, (batch, threads) in enumerate(configs):
        xs, heights, low, high = [], [], [], []
        for i, name in enumerate(names):
            match = [e for e in entries if (e.name, e.batch, e.threads) == (name, batch, threads)]
            if not match:
                continue
            lat = match[0].latency_ms
            xs.append(i - 0.4 + width * (k + 0.5))
            heights.append(lat.median / batch)
            low.append((lat.median - lat.p10) / batch)
            high.append((lat.p90 - lat.median) / batch)
        ax.bar(xs, heights, width * 0.9, yerr=[low, high], capsize=3,
               label=f"batch {batch}, threads {threads}")
    fabs = {e.name: e.fab for e in profile.engines}
    ax.set_xticks(range(len(names)), [f"{n}\nFAB {fabs[n]:.2f}" for n in names])
    ax.set_ylabel("ms per tile (median, p10-p90)")
    ax.set_title(f"{profile.model} on {profile.target}: tile {entries[0].tile}")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_pareto(profile: Profile, path: Path) -> Path:
    points = [Point(q.name, q.latency_ms.mean, q.psnr) for q in profile.quality]
    front = pareto_front(points)
    adaptive = profile.adaptive
    fig = _figure(6.0, 4.5)
    ax = fig.subplots()
    ax.scatter([p.latency for p in points], [p.psnr for p in points], color="tab:blue",
               label="static engines", zorder=3)
    for p in points:
        ax.annotate(p.name, (p.latency, p.psnr), textcoords="offset points", xytext=(5, 4))
    if front:
        xs = [p.latency for p in front] + [max(adaptive.latency_ms.mean,
                                               max(p.latency for p in points)) * 1.05]
        ys = [p.psnr for p in front] + [front[-1].psnr]
        ax.step(xs, ys, where="post", color="tab:blue", alpha=0.6, label="front (static)")
    verdict = "on/above front" if profile.pareto.adaptive_on_front else "below front"
    ax.scatter([adaptive.latency_ms.mean], [adaptive.psnr], marker="*", s=220, color="tab:red",
               label=f"adaptive ({verdict})", zorder=4)
    ax.annotate(f"adaptive FAB {adaptive.fab:.2f}", (adaptive.latency_ms.mean, adaptive.psnr),
                textcoords="offset points", xytext=(6, -12), color="tab:red")
    ax.set_xlabel("ms per frame (mean over images, through the dispatcher)")
    ax.set_ylabel("PSNR (dB, Y)")
    ax.set_title(f"{profile.model} on {profile.target}: PSNR vs latency")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_layers(profile: Profile, path: Path) -> Path:
    chosen: dict[str, Any] = {}
    for e in reference_entries(profile):
        if e.layers and e.name not in chosen:
            chosen[e.name] = e
    names = [n for n in _fab_order(profile) if n in chosen] or ["(none)"]
    fig = _figure(7.0, 1.0 + 2.2 * len(names))
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        entry = chosen.get(name)
        if entry is None:
            ax.text(0.5, 0.5, "no per-layer profile", ha="center", va="center")
            ax.set_axis_off()
            continue
        layers = list(reversed(entry.layers))
        ax.barh([x.name if x.name == OTHER else f"{x.name} ({x.op})" for x in layers],
                [x.ms for x in layers],
                color="tab:green")
        ax.set_title(f"{name}: tile {entry.tile}, batch {entry.batch}", fontsize="medium")
        ax.set_xlabel("ms per call")
        ax.tick_params(axis="y", labelsize="small")
    return _save(fig, path)


def plot_video(video: VideoQuality, title: str, path: Path) -> Path:
    fig = _figure(10.0, 4.2)
    for ax, label, values in zip(
            fig.subplots(1, 2), (f"VMAF NEG ({video.vmaf_model})", "PSNR (dB, Y)"),
            ([p.vmaf_neg for p in video.policies], [p.psnr for p in video.policies]),
            strict=True):
        for index, (p, value) in enumerate(zip(video.policies, values, strict=True)):
            adaptive = not p.policy.startswith("fixed:")
            ax.scatter([p.ms_per_frame], [value], marker="*" if adaptive else "o",
                       s=220 if adaptive else 40, color="tab:red" if adaptive else "tab:blue",
                       zorder=4 if adaptive else 3)
            ax.annotate(p.policy if adaptive else p.name, (p.ms_per_frame, value),
                        textcoords="offset points", xytext=(6, (4, -13, 14)[index % 3]),
                        color="tab:red" if adaptive else "black")
        ax.set_xlabel("ms per frame (through the dispatcher)")
        ax.set_ylabel(label)
    fig.suptitle(f"{title}: {Path(video.clip).name}, {video.frames} frames "
                 f"{video.width}x{video.height}")
    return _save(fig, path)


def write_plots(profile: Profile, folder: Path) -> dict[str, Path]:
    """Write the plots into ``folder`` (``video`` only for a profile with one); name -> path."""
    plots = {
        "latency": plot_latency(profile, folder / PLOTS["latency"]),
        "pareto": plot_pareto(profile, folder / PLOTS["pareto"]),
        "layers": plot_layers(profile, folder / PLOTS["layers"]),
    }
    if profile.video is not None:
        plots["video"] = plot_video(profile.video, f"{profile.model} on {profile.target}",
                                    folder / PLOTS["video"])
    return plots

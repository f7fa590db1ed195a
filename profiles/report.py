"""Reports a person reads: the terminal table, the Markdown report, the side-by-side comparison.

All three are built from the same rows (:func:`latency_rows`, :func:`frame_rows`), formatted by
:func:`format_table` as aligned text or as a Markdown table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from profiles.schema import PARETO_UNIT, EngineEntry, Profile, VideoQuality

__all__ = ["compare_table", "format_table", "frame_rows", "latency_rows", "markdown_report",
           "reference_entries", "terminal_report", "video_rows"]

LATENCY_HEADER = ("engine", "tile", "batch", "threads", "median ms", "p10", "p90", "spread",
                  "Mpix/s", "RSS MiB", "PSNR", "SSIM", "FAB", "GBitOPs")
FRAME_HEADER = ("engine", "ms/frame", "p10", "p90", "overhead ms", "PSNR", "SSIM", "FAB",
                "GBitOPs", "tiles")
VIDEO_HEADER = ("policy", "frames/s", "ms/frame", "PSNR (Y)", "loss vs top", "VMAF NEG",
                "tiles per rung")


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
                 markdown: bool = False) -> str:
    """Aligned text columns (first column left, the rest right) or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join([":--", *["--:"] * (len(header) - 1)]) + "|"]
        return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                         strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join(line(r) for r in [header, *rows])


def latency_rows(entries: Sequence[EngineEntry]) -> list[list[str]]:
    return [[e.name, str(e.tile), str(e.batch), str(e.threads), _num(e.latency_ms.median),
             _num(e.latency_ms.p10), _num(e.latency_ms.p90), f"{e.spread:.1%}",
             _num(e.throughput_mpix_s, 2), _num(e.peak_rss_mb, 0), _num(e.psnr),
             _num(e.ssim, 4), _num(e.fab, 2), _num(e.bitops)] for e in entries]


def _mix(histogram: Mapping[str, int]) -> str:
    total = sum(histogram.values())
    return " ".join(f"{k}:{v / total:.0%}" for k, v in histogram.items() if v) if total else "-"


def frame_rows(profile: Profile) -> list[list[str]]:
    return [[q.name, _num(q.latency_ms.mean), _num(q.latency_ms.p10), _num(q.latency_ms.p90),
             _num(q.overhead_ms), _num(q.psnr), _num(q.ssim, 4), _num(q.fab, 2),
             _num(q.bitops), _mix(q.histogram)] for q in (*profile.quality, profile.adaptive)]


def video_rows(video: VideoQuality) -> list[list[str]]:
    top = video.policy(video.top)
    return [[p.policy if p.policy.startswith("fixed:") else f"{p.name} ({p.policy})",
             _num(p.fps), _num(p.ms_per_frame, 1), _num(p.psnr),
             "-" if top is None else f"{top.psnr - p.psnr:+.4f}", _num(p.vmaf_neg),
             _mix(p.histogram)] for p in video.policies]


def _video_title(video: VideoQuality) -> str:
    return (f"{video.clip}: first {video.frames} frames ({video.width}x{video.height}) as the "
            f"originals, their MATLAB-bicubic downscale as the input; every rung (fixed:NAME) "
            f"and the default adaptive policy (hysteresis {video.hysteresis:g}), interleaved "
            f"per frame, batch {video.batch}; PSNR (Y) and VMAF NEG ({video.vmaf_model}) "
            f"against the originals, loss against {video.top}")


def reference_entries(profile: Profile) -> list[EngineEntry]:
    """The entries at the bundle's tile (the dispatcher's), else those of the first tile."""
    tile = profile.adaptive.tile
    chosen = [e for e in profile.engines if e.tile == tile]
    return chosen or [e for e in profile.engines if e.tile == profile.engines[0].tile]


def _top_layers(profile: Profile, count: int) -> list[str]:
    lines, seen = [], set()
    for e in reference_entries(profile):
        if e.name in seen or not e.layers:
            continue
        seen.add(e.name)
        parts = ", ".join(f"{x.name} {x.share:.0%} ({x.op})" for x in e.layers[:count])
        lines.append(f"  {e.name} (tile {e.tile}, batch {e.batch}): {parts}")
    return lines


def _title(profile: Profile) -> str:
    d = profile.device
    where = ", ".join(str(v) for v in (d.get("gpu") or d.get("processor"), d.get("machine"))
                      if v)
    return (f"{profile.model} on {profile.target} ({profile.backend}; {where}; "
            f"{profile.created})")


def terminal_report(profile: Profile) -> str:
    """Latency table, per-frame table, Pareto verdict, top layers, noise and notes."""
    s = profile.settings
    parts = [
        f"adasr profile: {_title(profile)}",
        f"latency per engine call: {s.repeat} x ({s.warmup} warm-up + {s.runs} timed) runs, "
        f"timer {profile.engines[0].timer}",
        format_table(LATENCY_HEADER, latency_rows(profile.engines)),
        "",
        f"per frame on {s.images} benchmark images ({PARETO_UNIT}):",
        format_table(FRAME_HEADER, frame_rows(profile)),
        "",
        f"Pareto: {profile.pareto.explanation}",
    ]
    if profile.video is not None:
        parts += ["", f"video: {_video_title(profile.video)}",
                  format_table(VIDEO_HEADER, video_rows(profile.video)), ""]
    parts += [
        f"noise: largest spread of the {s.repeat} repeated medians: {profile.max_spread:.1%}",
    ]
    layers = _top_layers(profile, 3)
    if layers:
        parts += ["top layers:", *layers]
    parts += [f"note: {note}" for note in profile.notes]
    return "\n".join(parts)


def markdown_report(profile: Profile, plots: Mapping[str, str] | None = None) -> str:
    """The report as Markdown; ``plots`` maps a title to an image path relative to the report."""
    s, d = profile.settings, profile.device
    lines = [
        f"# Profile: {profile.model} on {profile.target}",
        "",
        f"Bundle `{profile.bundle}`, backend {profile.backend}, measured {profile.created}.",
        "",
        "## Device and versions",
        "",
        format_table(("key", "value"), [[k, str(v)] for k, v in
                                         [*d.items(), *profile.versions.items()]], markdown=True),
        "",
        "## Latency per engine call",
        "",
        f"{s.repeat} repeats of {s.warmup} warm-up + {s.runs} timed runs per configuration on "
        f"random input; timer: {profile.engines[0].timer}. `spread` is max/min - 1 of the "
        f"repeats' medians (largest: {profile.max_spread:.1%}). Peak memory: {s.memory}.",
        "",
        format_table(LATENCY_HEADER, latency_rows(profile.engines), markdown=True),
        "",
        "## Quality and time per frame",
        "",
        f"{s.images} images from {', '.join(s.datasets)}, each upscaled {s.frame_repeats} "
        f"times through the dispatcher (batch {s.frame_batch}). Unit: {PARETO_UNIT}.",
        "",
        format_table(FRAME_HEADER, frame_rows(profile), markdown=True),
        "",
        "## Adaptive dispatcher against the static engines",
        "",
        ("**On or above the front.** " if profile.pareto.adaptive_on_front
         else "**Below the front.** ") + profile.pareto.explanation,
        "",
        f"Static engines on the front (fastest first): {', '.join(profile.pareto.front)}.",
        "",
    ]
    if profile.video is not None:
        lines += ["## Video quality", "", _video_title(profile.video) + ".", "",
                  format_table(VIDEO_HEADER, video_rows(profile.video), markdown=True), ""]
    for title, path in (plots or {}).items():
        lines += [f"![{title}]({path})", ""]
    lines += ["## Per-layer time", ""]
    for e in reference_entries(profile):
        if e.layers:
            lines += [f"### {e.name} (tile {e.tile}, batch {e.batch}, threads {e.threads})", "",
                      format_table(("layer", "op", "ms per call", "share"),
                                   [[x.name, x.op, _num(x.ms, 4), f"{x.share:.1%}"]
                                    for x in e.layers], markdown=True), ""]
    if profile.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in profile.notes), ""]
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b is not None else "-"


def compare_table(a: Profile, b: Profile) -> str:
    """Two profiles side by side: entries matched by (engine, tile, batch, threads), per-frame
    rows by engine name, video rows (when both have one) by policy; ratios are B / A (above 1:
    B is slower)."""
    keyed_b = {(e.name, e.tile, e.batch, e.threads): e for e in b.engines}
    rows, matched = [], set()
    for e in a.engines:
        key = (e.name, e.tile, e.batch, e.threads)
        other = keyed_b.get(key)
        if other is None:
            continue
        matched.add(key)
        rows.append([e.name, str(e.tile), str(e.batch), str(e.threads), _num(e.latency_ms.median),
                     _num(other.latency_ms.median),
                     _ratio(e.latency_ms.median, other.latency_ms.median),
                     _num(e.psnr), _num(other.psnr)])
    only_a = sorted({e.name for e in a.engines
                     if (e.name, e.tile, e.batch, e.threads) not in keyed_b})
    only_b = sorted({k[0] for k in keyed_b if k not in matched})
    frames_b = {q.name: q for q in (*b.quality, b.adaptive)}
    frame = [[q.name, _num(q.latency_ms.mean), _num(frames_b[q.name].latency_ms.mean),
              _ratio(q.latency_ms.mean, frames_b[q.name].latency_ms.mean), _num(q.psnr),
              _num(frames_b[q.name].psnr)]
             for q in (*a.quality, a.adaptive) if q.name in frames_b]
    parts = [f"A: {_title(a)}", f"B: {_title(b)}", "",
             format_table(("engine", "tile", "batch", "threads", "A median ms", "B median ms",
                           "B/A", "A PSNR", "B PSNR"), rows),
             "", "per frame (" + PARETO_UNIT + "):",
             format_table(("engine", "A ms/frame", "B ms/frame", "B/A", "A PSNR", "B PSNR"),
                          frame)]
    if only_a or only_b:
        parts.append(f"unmatched configurations: only in A: {', '.join(only_a) or '-'}; "
                     f"only in B: {', '.join(only_b) or '-'}")
    if a.video is not None and b.video is not None:
        video_b = {p.policy: p for p in b.video.policies}
        parts += ["", f"video (A: {a.video.clip}, {a.video.frames} frames; B: {b.video.clip}, "
                      f"{b.video.frames} frames):",
                  format_table(("policy", "A ms/frame", "B ms/frame", "B/A", "A PSNR", "B PSNR",
                                "A VMAF NEG", "B VMAF NEG"),
                               [[p.policy, _num(p.ms_per_frame, 1),
                                 _num(video_b[p.policy].ms_per_frame, 1),
                                 _ratio(p.ms_per_frame, video_b[p.policy].ms_per_frame),
                                 _num(p.psnr), _num(video_b[p.policy].psnr), _num(p.vmaf_neg),
                                 _num(video_b[p.policy].vmaf_neg)]
                                for p in a.video.policies if p.policy in video_b])]
    return "\n".join(parts)

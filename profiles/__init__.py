"""adasr profiles: measure a bundle's engines on the device it runs on.

Latency per engine (bit-width / precision mix), tile, batch and threads; quality per engine and
of the adaptive dispatcher on a benchmark; Y-PSNR and VMAF NEG of every rung and the default
adaptive policy on a video clip (:mod:`profiles.video`); per-layer times; reports and plots.
Results are stored as ``profiles/results/<target>/<model>.json`` (schema ``adasr.profile/1``,
:mod:`profiles.schema`) and in the bundle (``manifest.profile``), where the dispatcher's budget
policy reads them.

Entry points: :func:`profile_bundle` / :func:`save_profile` (:mod:`profiles.profiler`),
:func:`read_profile`, the reports (:mod:`profiles.report`) and plots (:mod:`profiles.plots`).
Nothing here imports torch or onnx at import time; matplotlib, onnx (layer names, BitOPs) and
TensorRT are imported where they are used.
"""

from profiles.profiler import ProfileOptions, profile_bundle, results_path, save_profile
from profiles.schema import SCHEMA, Profile, profile_from_json, read_profile

__all__ = [
    "SCHEMA",
    "Profile",
    "ProfileOptions",
    "profile_bundle",
    "profile_from_json",
    "read_profile",
    "results_path",
    "save_profile",
]

"""What a profile records about where it ran: the device and the library versions.

Versions come from package metadata (nothing heavy is imported); TensorRT's is read from the
module itself, and only for TensorRT bundles (where it is installed by JetPack, not pip).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import installed_version, runtime_backend
from runtime.manifest import Manifest
from targets import probe_device

__all__ = ["device_info", "library_versions"]

_CPUINFO = Path("/proc/cpuinfo")


def _cpu_model() -> str:
    try:
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_info() -> dict[str, Any]:
    """Machine, CPU model and core counts, OS, Jetson model and GPU name (None when absent)."""
    facts = probe_device()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "machine": facts.machine,
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "system": platform.platform(),
        "jetson_model": facts.jetson_model,
        "gpu": facts.gpu_name,
    }


def library_versions(manifest: Manifest) -> dict[str, str | None]:
    """Versions used now (python, numpy, adasr, backend) and those the bundle was built with."""
    versions: dict[str, str | None] = {
        "adasr": installed_version("adasr"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": installed_version("onnxruntime"),
        "onnx": installed_version("onnx"),
        "matplotlib": installed_version("matplotlib"),
    }
    versions.update(runtime_backend(manifest.backend).versions())
    versions["bundle_adasr"] = manifest.build.adasr
    versions["bundle_onnxruntime"] = manifest.build.onnxruntime
    versions["bundle_tensorrt"] = manifest.build.tensorrt
    versions["bundle_device"] = manifest.build.device
    return versions

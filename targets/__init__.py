"""adasr targets: one data file per device and the small loader that validates them."""

from targets.loader import (
    BACKENDS,
    GPU_ARCHS,
    PRECISIONS,
    Backend,
    DeviceFacts,
    DeviceMatch,
    GpuArch,
    Precision,
    Target,
    TensorRTRange,
    detect_target,
    list_targets,
    load_target,
    match_target,
    probe_device,
)

__all__ = [
    "BACKENDS",
    "GPU_ARCHS",
    "PRECISIONS",
    "Backend",
    "DeviceFacts",
    "DeviceMatch",
    "GpuArch",
    "Precision",
    "Target",
    "TensorRTRange",
    "detect_target",
    "list_targets",
    "load_target",
    "match_target",
    "probe_device",
]

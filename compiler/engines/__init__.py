"""Engine builders: one ONNX engine graph to one serialized engine for one device.

Importing this package never imports TensorRT: each builder imports its backend inside the
functions that need it, so the compiler installs and imports on a machine without a GPU.
"""

from compiler.engines.tensorrt_build import (
    TrtBuildSpec,
    build_engine,
    device_name,
    engine_cache_key,
    spec_for_target,
    tensorrt_version,
)

__all__ = [
    "TrtBuildSpec",
    "build_engine",
    "device_name",
    "engine_cache_key",
    "spec_for_target",
    "tensorrt_version",
]

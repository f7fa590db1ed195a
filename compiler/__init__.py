"""adasr compiler: from a checkpoint to a bundle.

Model zoo, quantizers, bit mapping, calibration, lowering to ONNX Q/DQ, engine builders and the
bundle writer. Importing the package is cheap: torch is imported by the modules that need it.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("adasr")
except _metadata.PackageNotFoundError:  # a source checkout that was not installed
    __version__ = "0.0.0+source"

"""adasr runtime: what ships to the device.

Engine backends, the numpy bit-mapping statistic, tiling and stitching, the dispatcher and the
video loop. Imports nothing from the rest of the project and never imports torch or onnx, so a
Jetson without PyTorch can run bundles. It also owns the shared vocabulary (errors, numerics on
images) that the other packages import.
"""

from runtime.errors import AdasrError

__all__ = ["AdasrError"]
__version__ = "0.1.0"

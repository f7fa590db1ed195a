"""``adasr build --finish``: build a bundle's pending files (TensorRT plans) on the device.

Imports neither torch nor onnx, so it runs where adasr was installed without the compiler's
extra (a Jetson with JetPack's TensorRT): the backend's builder
(:meth:`compiler.backends.Builder.finish_on_device`) does the work, the manifest is written last.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compiler.backends import builder
from runtime.manifest import Manifest, read_manifest, write_manifest
from targets.loader import Target

Progress = Callable[[str], None]


def finish_bundle(bundle: Path, target: Target, *, batch: int | None = None,
                  progress: Progress = lambda _: None) -> Manifest:
    """On the device: build the pending files of ``bundle`` in place, manifest last."""
    manifest = read_manifest(bundle)
    finished = builder(manifest.backend).finish_on_device(bundle, manifest, target, batch,
                                                          progress)
    write_manifest(bundle, finished)
    return finished

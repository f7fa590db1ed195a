"""The device-side commands: ``adasr run`` and ``adasr inspect`` (``adasr profile`` lives in
:mod:`profiles.command`). They import only the runtime, so they work on a device where adasr was
installed without the compiler's extra (no torch, no onnx).

Each module has ``add_arguments(parser)`` and ``run(args) -> int``; :mod:`compiler.cli` lists them
with the compiler's commands.
"""

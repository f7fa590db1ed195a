"""Engine backends behind one protocol (:class:`runtime.engines.base.Engine`).

One module per backend, imported only when used: ``onnxruntime`` (CPU), ``tensorrt`` (GPU, raw
TensorRT runtime API; the only modules that import tensorrt / CUDA bindings live here), ``fake``
(tests and CI).
"""

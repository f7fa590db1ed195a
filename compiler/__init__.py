"""adasr compiler: from a checkpoint to a bundle.

Model zoo, quantizers, bit mapping, calibration, lowering to ONNX Q/DQ, engine builders and the
bundle writer. Importing the package is cheap: torch is imported by the modules that need it.
"""

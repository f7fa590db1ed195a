"""Quantization: fake-quant quantizers, AdaBM bit mapping, DDTB gates, calibration, records."""

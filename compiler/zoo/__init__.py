"""The model zoo: super-resolution networks that quantization and lowering handle uniformly.

``load_model(path, scale=None)`` recognises a checkpoint's architecture (EDSR, SRResNet and RDN
in the EDSR-PyTorch layout, CARN, CARN-M, IMDN, RFDN) from its keys and shapes; every network is
an :class:`SRNet` (see ``base.py``) taking and returning RGB in [0, 1].
"""

from __future__ import annotations

from compiler.zoo.base import LoadedModel, ModelInfo, SRNet
from compiler.zoo.detect import ARCHS, load_model, load_state_dict_file

__all__ = ["ARCHS", "LoadedModel", "ModelInfo", "SRNet", "load_model", "load_state_dict_file"]

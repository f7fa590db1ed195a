"""The fake ``tensorrt`` and CUDA modules of the tests cannot offer what the real ones lack.

Every public name a fake module, class or enum defines must exist on its real counterpart:
the builder's fake (tests/compiler/test_tensorrt_build.py) in TensorRT for RTX
(``tensorrt_rtx``: Builder, OnnxParser, network, config), the runtime's fake
(tests/runtime/test_tensorrt_engine.py) in TensorRT's lean runtime (``tensorrt_lean`` 11:
Runtime, ICudaEngine, IExecutionContext). Both real bindings import without a GPU (test
dependencies). pycuda does not install without a CUDA driver, so its fake is checked only by the
``gpu``-marked test on a device. A fake that invents an attribute (pycuda's stream capture was
one) fails here.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from pathlib import Path
from typing import Any

import pytest
import tensorrt_lean
import tensorrt_rtx

from tests.compiler import test_tensorrt_build as build_fakes
from tests.runtime import test_tensorrt_engine as runtime_fakes


def _public(fake: Any) -> set[str]:
    """The public names a fake defines itself (class body, enum members, module attributes)."""
    if isinstance(fake, types.ModuleType):
        return {name for name in vars(fake) if not name.startswith("_")} | {"__version__"}
    if isinstance(fake, type) and issubclass(fake, enum.Enum):
        return set(fake.__members__)
    names = {name for name in vars(fake) if not name.startswith("_")}
    return names - {f.name for f in dataclasses.fields(fake)} if dataclasses.is_dataclass(
        fake) else names


def _missing(fake: Any, real: Any, also: set[str] = frozenset()) -> list[str]:
    return sorted(name for name in _public(fake) | also if not hasattr(real, name))


def _builder_fake() -> tuple[types.ModuleType, Any, Any]:
    """The builder's fake module, one of its networks and one of its parsers."""
    fake = build_fakes.make_fake_tensorrt("10.3.0.30", build_fakes.Knobs(), build_fakes.Record())
    builder = fake.Builder(fake.Logger(fake.Logger.WARNING))
    network = builder.create_network(0)
    return fake, network, fake.OnnxParser(network, None)


def test_the_builders_fake_tensorrt_exists_in_tensorrt_rtx() -> None:
    fake, network, parser = _builder_fake()
    trt = tensorrt_rtx
    pairs: list[tuple[Any, Any, set[str]]] = [
        (fake, trt, set()),
        (fake.Builder, trt.Builder, set()),
        (type(network), trt.INetworkDefinition, set()),
        (type(parser), trt.OnnxParser, set()),
        (fake.Logger, trt.Logger, set()),
        (build_fakes.FakeConfig, trt.IBuilderConfig, set()),
        (build_fakes.FakeProfile, trt.IOptimizationProfile, set()),
        (build_fakes.FakeTimingCache, trt.ITimingCache, set()),
        (build_fakes.FakeParserError, trt.ParserError, set()),
        (build_fakes.FakeTensor, trt.ITensor, {"name", "shape"}),
        (build_fakes.NetworkDefinitionCreationFlag, trt.NetworkDefinitionCreationFlag, set()),
        (build_fakes.MemoryPoolType, trt.MemoryPoolType, set()),
    ]
    problems = {f"{getattr(f, '__name__', f)}": _missing(f, real, also)
                for f, real, also in pairs}
    assert not {k: v for k, v in problems.items() if v}, problems


def test_the_runtimes_fake_tensorrt_exists_in_tensorrt_lean() -> None:
    trt = tensorrt_lean
    fake = runtime_fakes.make_fake_tensorrt(runtime_fakes.Gpu(), runtime_fakes.Trt())
    pairs: list[tuple[Any, Any, set[str]]] = [
        (fake, trt, set()),
        (fake.Runtime, trt.Runtime, set()),
        (fake.Logger, trt.Logger, set()),
        (runtime_fakes.FakeEngine, trt.ICudaEngine, {"num_io_tensors"}),
        (runtime_fakes.FakeContext, trt.IExecutionContext, set()),
        (runtime_fakes.TensorIOMode, trt.TensorIOMode, set()),
        (runtime_fakes.DataType, trt.DataType, set()),
        (runtime_fakes.ExecutionContextAllocationStrategy,
         trt.ExecutionContextAllocationStrategy, set()),
    ]
    problems = {f"{getattr(f, '__name__', f)}": _missing(f, real, also)
                for f, real, also in pairs}
    assert not {k: v for k, v in problems.items() if v}, problems


def test_the_check_catches_an_invented_attribute() -> None:
    class FakeStreamWithCapture:
        def synchronize(self) -> None: ...

        def begin_capture(self) -> None: ...

    class FakeContextWithExtra(runtime_fakes.FakeContext):
        def execute_async_v9(self) -> bool:
            return True

    assert _missing(FakeContextWithExtra, tensorrt_lean.IExecutionContext) == [
        "execute_async_v9"]
    real_stream = type("Stream", (), {"synchronize": None, "handle": 0})  # pycuda's, in short
    assert _missing(FakeStreamWithCapture, real_stream) == ["begin_capture"]


@pytest.mark.gpu
def test_the_fake_pycuda_exists_in_pycuda(tmp_path: Path) -> None:
    import pycuda.driver as driver

    fake = runtime_fakes.make_fake_driver(runtime_fakes.Gpu())
    problems = {"driver": _missing(fake, driver),
                "Stream": _missing(runtime_fakes.FakeStream, driver.Stream, {"handle"}),
                "Device": _missing(fake.Device, driver.Device),
                "Context": _missing(fake.Context, driver.Context)}
    assert not {k: v for k, v in problems.items() if v}, problems

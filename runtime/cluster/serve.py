"""``adasr serve``: a Ray Serve application that upscales images over HTTP (``ray[serve]``).

Two deployments:

- **ingress** (``POST /`` with an image file as the body, answered with the SR image as PNG): a
  :class:`~runtime.dispatch.Dispatcher` per request thread tiles the image, computes the
  statistic and picks an engine per tile exactly as ``adasr run`` does for an image; its engines
  are :class:`RemoteEngine` stand-ins that send each engine's batch of tiles to
- **engines**: one replica holds the bundle and activates an engine the first time a request for
  it arrives (``@serve.multiplexed``, the engine name is the model id); ``@serve.batch`` gathers
  the calls that arrive within ``batch_wait_s`` and splits them by model id, so the tiles of
  concurrent requests for the same engine run as one batch (per-engine batching across requests).

HTTP listens on 127.0.0.1 unless told otherwise. Images are independent (no hysteresis).
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.bundle import open_bundle
from runtime.cluster.worker import DispatchSettings
from runtime.dispatch import Dispatcher
from runtime.engines.base import Batch, Engine
from runtime.errors import MediaError
from runtime.imaging import load_rgb

__all__ = ["RemoteEngine", "ServeOptions", "build_app"]

INGRESS = "AdasrIngress"
ENGINES = "AdasrEngines"


@dataclass(frozen=True)
class ServeOptions:
    """How the application batches and scales."""

    max_batch: int = 8  # engine calls (each a batch of tiles) merged into one
    batch_wait_s: float = 0.005  # how long the first call waits for others
    engine_replicas: int = 1


class RemoteEngine(Engine):
    """An engine whose ``infer`` runs on the engines deployment (model id = its name)."""

    def __init__(self, name: str, scale: int, tile: int | None, handle: Any) -> None:
        super().__init__(name, scale, tile)
        self._handle = handle.options(multiplexed_model_id=name)

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, batch: Batch) -> Batch:
        result: Batch = self._handle.infer.remote(batch).result()
        return result

    def _deactivate_impl(self) -> None:
        pass


def _split(outputs: Batch, sizes: Sequence[int]) -> list[Batch]:
    bounds = np.cumsum(sizes)[:-1]
    return list(np.split(outputs, bounds))


def build_app(settings: DispatchSettings, options: ServeOptions) -> Any:
    """The Serve application (``serve.run`` it); ``settings.policy`` / mode / batch / stitch
    apply as in ``adasr run``, ``settings.threads`` to each engine."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    bundle_path = str(settings.bundle.resolve())

    @serve.deployment(name=ENGINES, num_replicas=options.engine_replicas,
                      ray_actor_options={"num_cpus": settings.threads or 1})
    class Engines:
        def __init__(self) -> None:
            self.bundle = open_bundle(Path(bundle_path))
            self.batches: list[tuple[str, int]] = []  # (engine, calls merged) per batch

        @serve.multiplexed(max_num_models_per_replica=64)  # type: ignore[untyped-decorator]
        async def engine(self, name: str) -> Engine:
            engine = self.bundle.engine(name, threads=settings.threads)
            engine.activate()
            return engine

        @serve.batch(max_batch_size=options.max_batch,  # type: ignore[untyped-decorator]
                     batch_wait_timeout_s=options.batch_wait_s)
        async def infer(self, batches: list[Batch]) -> list[Batch]:
            name = serve.get_multiplexed_model_id()
            engine = await self.engine(name)
            self.batches.append((name, len(batches)))
            outputs = engine.infer(np.concatenate(batches))
            return _split(outputs, [len(batch) for batch in batches])

        def merged(self) -> list[tuple[str, int]]:
            return list(self.batches)

    @serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0})
    class Ingress:
        def __init__(self, engines: Any) -> None:
            self.engines = engines
            self.bundle = open_bundle(Path(bundle_path), verify=False, any_machine=True)
            self.local = threading.local()

        def _dispatcher(self) -> Dispatcher:
            """This request thread's dispatcher (a dispatcher keeps per-frame buffers)."""
            dispatcher: Dispatcher | None = getattr(self.local, "dispatcher", None)
            if dispatcher is None:
                manifest = self.bundle.manifest
                remote: dict[str, Engine] = {
                    name: RemoteEngine(name, manifest.model.scale, manifest.tile, self.engines)
                    for name in manifest.names}
                dispatcher = settings.dispatcher(self.bundle, remote).__enter__()
                self.local.dispatcher = dispatcher
            return dispatcher

        def _upscale(self, body: bytes) -> bytes:
            image = _decode(body)
            dispatcher = self._dispatcher()
            dispatcher.reset()
            return _png(dispatcher.upscale(image).sr)

        async def __call__(self, request: Request) -> Response:
            from runtime.errors import AdasrError

            body = await request.body()
            try:
                png = await asyncio.to_thread(self._upscale, body)
            except AdasrError as error:
                return Response(f"{error}\n", status_code=400, media_type="text/plain")
            return Response(png, media_type="image/png")

    return Ingress.bind(Engines.bind())  # type: ignore[attr-defined]


def _decode(body: bytes) -> npt.NDArray[np.uint8]:
    """The RGB pixels of an image file's bytes (any format :func:`load_rgb` reads)."""
    handle, name = tempfile.mkstemp(prefix="adasr-serve-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(body)
        return load_rgb(name)
    except MediaError as error:
        detail = str(error).split(": ", 1)[-1]
        raise MediaError(f"cannot read image from the request body ({len(body)} bytes): "
                         f"{detail}; send a PNG, JPEG or other image file") from error
    finally:
        os.unlink(name)


def _png(pixels: npt.NDArray[np.uint8]) -> bytes:
    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    return encoded.getvalue()

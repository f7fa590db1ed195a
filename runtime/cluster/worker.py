"""The worker side of a cluster job: one chunk of frames in, its upscaled frames (or encoded
segment) out.

A :class:`ChunkWorker` is a Ray actor (the driver wraps the plain class with ``ray.remote``): it
opens the bundle and activates its engines once, in ``__init__``, and then upscales chunk after
chunk with the same :class:`~runtime.dispatch.Dispatcher` and the same
:func:`~runtime.pipeline.run_pipeline` loop as ``adasr run`` (tiles batched per engine, dispatch
and encoding overlapped). A video chunk starts from the hysteresis state the driver measured at
its first frame (:meth:`Dispatcher.restore`) and is encoded with :class:`~runtime.video.VideoWriter`
into an MP4 segment whose bytes are returned; an image chunk returns the SR images.

A worker killed mid-chunk (SIGKILL, OOM) cannot remove its segment folder; the folders are named
``adasr-chunk-<pid>-*`` so that every worker starting on the host removes those of processes that
no longer exist (:func:`sweep_dead_chunk_folders`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.bundle import Bundle, open_bundle
from runtime.dispatch import Dispatcher, FrameResult, HysteresisState
from runtime.engines.base import Engine
from runtime.pipeline import FrameRecord, RunStats, run_pipeline
from runtime.policies import bundle_policy
from runtime.tiling import StitchMode
from runtime.video import EncoderSettings, VideoWriter

__all__ = ["Chunk", "ChunkResult", "ChunkWorker", "DispatchSettings", "frame_digest",
           "sweep_dead_chunk_folders"]

CHUNK_PREFIX = "adasr-chunk-"

Frame = npt.NDArray[np.uint8]
ChunkKey = tuple[int, int]  # (input number, chunk number)


def frame_digest(frame: Frame) -> str:
    """The sha256 of an SR frame's RGB bytes: compares frames exactly without moving them."""
    return hashlib.sha256(np.ascontiguousarray(frame).data).hexdigest()


@dataclass(frozen=True)
class DispatchSettings:
    """Everything that decides the frames: the same options as ``adasr run``."""

    bundle: Path
    mode: str = "patch"
    policy: str | None = None  # None: the bundle's default (runtime.policies.bundle_policy)
    batch: int = 8
    stitch: StitchMode = "crop"
    hysteresis: float = 0.0
    threads: int | None = None  # intra-op threads of CPU engines (None: the bundle's)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)

    def dispatcher(self, bundle: Bundle, engines: Mapping[str, Engine] | None = None,
                   ) -> Dispatcher:
        """The dispatcher these settings describe over ``bundle`` (engines not yet active;
        ``engines``: these instead of the bundle's own)."""
        policy, latencies = bundle_policy(self.policy, bundle.root, bundle.manifest)
        if engines is None:
            engines = bundle.engines(threads=self.threads)
        return Dispatcher(bundle.manifest, engines, mode=self.mode,
                          policy=policy, batch=self.batch, stitch=self.stitch,
                          hysteresis=self.hysteresis, latencies=latencies)


@dataclass(frozen=True)
class Chunk:
    """Consecutive frames of one input, as the driver cut them."""

    job: int  # input number
    index: int  # chunk number within the input
    first: int  # index of its first frame in the input
    count: int
    fps: Fraction | None  # video: the input's frame rate; None: independent images
    state: HysteresisState | None = None  # video: the dispatcher's state before ``first``
    names: tuple[str, ...] = ()  # images: the input file names
    digest: bool = False  # return the sha256 of every SR frame (exact comparisons)

    @property
    def key(self) -> ChunkKey:
        return (self.job, self.index)

    @property
    def video(self) -> bool:
        return self.fps is not None


@dataclass(frozen=True)
class ChunkResult:
    """What a worker sends back for a :class:`Chunk`."""

    key: ChunkKey
    first: int
    stats: RunStats  # its records' indices are frame indices in the input
    segment: bytes | None  # video: the encoded MP4 segment
    images: tuple[Frame, ...]  # images: the SR images, in order
    worker: str  # host:pid that made it
    digests: tuple[str, ...] = ()  # with Chunk.digest: sha256 of each SR frame's RGB bytes


class ChunkWorker:
    """Upscale chunks with one bundle; see the module docstring. ``board``: the name of a
    :class:`~runtime.cluster.progress.ProgressBoard` actor told of starts and frames (by name,
    so that a restarted worker finds it: no constructor argument lives in the object store)."""

    def __init__(self, settings: DispatchSettings, board: str | None = None) -> None:
        import ray

        self.settings = settings
        self.board: Any = None if board is None else ray.get_actor(board)
        self.bundle = open_bundle(settings.bundle)
        self.dispatcher = settings.dispatcher(self.bundle).__enter__()  # engines load once
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        sweep_dead_chunk_folders()

    def pid(self) -> int:
        return os.getpid()

    def upscale(self, chunk: Chunk, frames: Sequence[Frame]) -> ChunkResult:
        if self.board is not None:
            self.board.started.remote(chunk.key, self.name)
        manifest = self.bundle.manifest
        kept: list[Frame] = []
        digests: list[str] = []

        def tick(record: FrameRecord) -> None:
            if self.board is not None:
                self.board.advanced.remote(chunk.key)

        def keep(frame: Frame) -> None:
            if chunk.digest:
                digests.append(frame_digest(frame))
            if chunk.fps is None:
                kept.append(frame)

        segment = None
        if chunk.fps is not None:
            self.dispatcher.restore(chunk.state)
            with tempfile.TemporaryDirectory(prefix=f"{CHUNK_PREFIX}{os.getpid()}-") as folder:
                path = Path(folder) / "segment.mp4"
                with VideoWriter(path, chunk.fps, settings=self.settings.encoder) as writer:

                    def write(index: int, result: FrameResult) -> None:
                        keep(result.sr)
                        writer.write(result.sr)

                    stats = run_pipeline(frames, self.dispatcher, write, manifest=manifest,
                                         on_frame=tick)
                segment = path.read_bytes()
        else:
            stats = run_pipeline(frames, self.dispatcher, lambda index, result: keep(result.sr),
                                 manifest=manifest, names=chunk.names, independent=True,
                                 on_frame=tick)
        records = tuple(dataclasses.replace(record, index=chunk.first + record.index)
                        for record in stats.records)
        return ChunkResult(chunk.key, chunk.first, dataclasses.replace(stats, records=records),
                           segment, tuple(kept), self.name, tuple(digests))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_dead_chunk_folders(root: Path | None = None) -> list[Path]:
    """Remove this user's ``adasr-chunk-<pid>-*`` folders in ``root`` (the temp folder) whose
    process is gone: what a killed worker left. Returns the folders removed."""
    import shutil

    base = Path(tempfile.gettempdir() if root is None else root)
    removed = []
    for folder in base.glob(f"{CHUNK_PREFIX}*-*"):
        pid_text = folder.name[len(CHUNK_PREFIX):].split("-", 1)[0]
        try:
            info = folder.lstat()
        except OSError:
            continue
        if (not pid_text.isdigit() or not folder.is_dir() or folder.is_symlink()
                or info.st_uid != os.getuid() or _alive(int(pid_text))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed

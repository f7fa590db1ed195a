"""The driver of a cluster job: cut the inputs into chunks, hand them to dispatcher actors, join.

:func:`run_job` runs on the machine that holds the inputs (the Ray driver):

1. **Cut.** Each input is decoded once, in order, by the driver (:func:`runtime.video.read_frames`,
   :func:`runtime.imaging.load_rgb`) and cut into chunks of ``chunk_frames`` consecutive frames.
   For a video the driver also runs the dispatcher's statistic and hysteresis over every frame
   (:meth:`Dispatcher.observe`, no engine), so each chunk carries the exact hysteresis state
   before its first frame: see :mod:`runtime.cluster` for why this makes the cluster's frames
   those of one process. At most ``workers + 1`` chunks are in flight (the object store holds
   their frames), so memory does not grow with the clip.
2. **Dispatch.** :class:`~runtime.cluster.worker.ChunkWorker` actors (one CPU each and
   ``threads`` engine threads), in a ``ray.util.ActorPool``, upscale chunk after chunk; each
   loads the bundle's engines once. Ray restarts a worker that dies (``max_restarts``) and runs
   its chunk again (``max_task_retries``): every frame is made exactly once in the output,
   because a chunk's result is taken only from the attempt that finished.
3. **Write.** A video chunk comes back as an encoded MP4 segment, stored in a hidden staging
   folder beside the output; when every chunk of an input is back they are joined in order with
   the input's audio (:func:`~runtime.cluster.join.join_segments`), written under a temporary
   name and renamed: an output exists under its name only when complete. Images are written one
   by one, each atomically, as ``adasr run`` does. On an error (an input that fails to decode
   stops the job once the chunks in flight are back) or Ctrl-C, the leading chunks back of each
   unfinished video are joined into a playable ``NAME.partial.EXT``, as ``adasr run`` keeps
   its frames, and the error names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.bundle import open_bundle
from runtime.cluster.join import join_segments
from runtime.cluster.progress import Attempt, JobProgress, ProgressBoard
from runtime.cluster.worker import Chunk, ChunkKey, ChunkResult, ChunkWorker, DispatchSettings
from runtime.dispatch import Dispatcher
from runtime.errors import AdasrError, ConfigError, EngineError, MediaError
from runtime.fileio import atomic_write_bytes
from runtime.imaging import load_rgb, save_rgb
from runtime.pipeline import FrameRecord, image_jobs, is_image
from runtime.video import partial_path, probe, read_frames

__all__ = ["ClusterInput", "JobReport", "connect", "plan_inputs", "run_job"]

Frame = npt.NDArray[np.uint8]
DEFAULT_CHUNK_FRAMES = 16
DEFAULT_RETRIES = 3
_POLL_S = 0.25


@dataclass(frozen=True)
class ClusterInput:
    """One input of a job and where its result goes."""

    source: Path  # a video, an image or a folder of images
    output: Path  # a video file, or for images what :func:`runtime.pipeline.image_jobs` takes
    video: bool

    def images(self) -> list[tuple[Path, Path]]:
        return [] if self.video else image_jobs(self.source, self.output)


def plan_inputs(sources: Sequence[Path], output: Path) -> list[ClusterInput]:
    """One input to ``output`` as named; several into the folder ``output`` as
    ``<stem>.mp4`` (videos), ``<stem>.png`` (images) or ``<name>/`` (folders)."""
    if not sources:
        raise ConfigError("give at least one input")
    for source in sources:
        if not source.exists():
            raise ConfigError(f"input {source} does not exist")
    video = [not (source.is_dir() or is_image(source)) for source in sources]
    if len(sources) == 1:
        return [ClusterInput(sources[0], output, video[0])]
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{len(sources)} inputs go into a folder; {output} is a file")
    named = [output / (source.name if source.is_dir() else
                       f"{source.stem}{'.mp4' if is_video else '.png'}")
             for source, is_video in zip(sources, video, strict=True)]
    repeated = sorted({path.name for path in named if named.count(path) > 1})
    if repeated:
        raise ConfigError(f"two inputs would both write {output / repeated[0]}: give inputs "
                          "with different names")
    return [ClusterInput(source, path, is_video)
            for source, path, is_video in zip(sources, named, video, strict=True)]


@contextmanager
def connect(address: str | None = None, *, num_cpus: int | None = None,
            quiet: bool = True) -> Iterator[None]:
    """A Ray connection for the ``with`` block: ``address`` None starts a local cluster on
    this machine (stopped at the end; Ray names it by the machine's address, not 127.0.0.1, and
    requires its token), ``"auto"`` or ``HOST:PORT`` joins a running one. Inside an
    already connected process (tests) that connection is used and kept."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=not quiet, configure_logging=not quiet)
        else:
            ray.init(address=address, log_to_driver=not quiet, configure_logging=not quiet)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = "a local cluster" if address is None else f"the cluster at {address}"
        raise ConfigError(f"cannot connect to {where}: {err}") from err
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class _Output:
    """The driver's book-keeping for one input."""

    spec: ClusterInput
    staging: Path | None = None  # video: where its segments wait
    fps: Fraction = Fraction(0)
    cut: int = 0  # chunks cut so far
    done: int = 0  # chunks back
    finished_cutting: bool = False
    frames: int = 0
    written: bool = False


@dataclass(frozen=True)
class JobReport:
    """What a job did."""

    outputs: tuple[tuple[Path, int], ...]  # (output, frames) per input
    records: tuple[FrameRecord, ...]  # every frame, input after input
    histogram: Mapping[str, int]  # engine -> tiles
    wall_s: float
    retried: int  # chunks started more than once (a worker died under them)
    workers: int
    chunk_workers: Mapping[ChunkKey, str] = field(default_factory=dict)  # who made each chunk
    digests: tuple[str, ...] = ()  # run_job(digests=True): per frame, input after input

    @property
    def frames(self) -> int:
        return sum(frames for _, frames in self.outputs)

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_fab(self) -> float:
        return sum(r.fab for r in self.records) / len(self.records) if self.records else 0.0


def _cut_video(job: int, spec: ClusterInput, observer: Dispatcher, size: int,
               limit: int | None, digest: bool) -> Iterator[tuple[Chunk, list[Frame]]]:
    fps = probe(spec.source).fps
    observer.reset()
    frames: list[Frame] = []
    state, first, index = None, 0, 0
    for frame in read_frames(spec.source, limit=limit):
        frames.append(frame)
        observer.observe(frame)
        if len(frames) == size:
            yield Chunk(job, index, first, size, fps, state, digest=digest), frames
            state, first, index, frames = observer.state, first + size, index + 1, []
    if frames:
        yield Chunk(job, index, first, len(frames), fps, state, digest=digest), frames


def _cut_images(job: int, pairs: Sequence[tuple[Path, Path]], size: int,
                digest: bool) -> Iterator[tuple[Chunk, list[Frame]]]:
    for index, start in enumerate(range(0, len(pairs), size)):
        part = pairs[start : start + size]
        names = tuple(source.name for source, _ in part)
        yield (Chunk(job, index, start, len(part), None, names=names, digest=digest),
               [load_rgb(source) for source, _ in part])


def _actor_error(error: Exception) -> AdasrError:
    """An AdasrError for a failed chunk: the worker's own when it raised one."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, AdasrError):
        return type(cause)(str(cause))
    return EngineError(f"a cluster worker failed and its retries are spent: "
                       f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")


class _Job:
    """The state of one :func:`run_job` call."""

    def __init__(self, inputs: Sequence[ClusterInput], settings: DispatchSettings,
                 chunk_frames: int, limit: int | None, digest: bool) -> None:
        self.settings = settings
        self.digest = digest
        self.outputs = [_Output(spec) for spec in inputs]
        self.chunk_frames = chunk_frames
        self.limit = limit
        # checked here once, so that a bad bundle fails before any worker starts; the workers
        # check it again (and their machine) where they run
        bundle = open_bundle(settings.bundle, any_machine=True)
        self.observer = settings.dispatcher(bundle)  # statistic and hysteresis only
        self.images = [spec.images() for spec in inputs]
        self.total = sum(self._declared(spec, pairs) for spec, pairs in zip(inputs, self.images,
                                                                            strict=True))
        self.results: dict[ChunkKey, ChunkResult] = {}
        self.start = time.perf_counter()

    def _declared(self, spec: ClusterInput, pairs: list[tuple[Path, Path]]) -> int:
        if not spec.video:
            return len(pairs[: self.limit])
        known = [count for count in (probe(spec.source).frames, self.limit) if count]
        return min(known) if known else 0

    def chunks(self) -> Iterator[tuple[Chunk, list[Frame]]]:
        for job, (out, pairs) in enumerate(zip(self.outputs, self.images, strict=True)):
            if out.spec.video:
                out.staging = Path(tempfile.mkdtemp(prefix=f".{out.spec.output.name}.chunks-",
                                                    dir=_parent(out.spec.output)))
                cut = _cut_video(job, out.spec, self.observer, self.chunk_frames, self.limit,
                                 self.digest)
            else:
                cut = _cut_images(job, pairs[: self.limit], self.chunk_frames, self.digest)
            for chunk, frames in cut:
                out.cut += 1
                if chunk.fps is not None:
                    out.fps = chunk.fps
                yield chunk, frames
            out.finished_cutting = True
            self._finish(out)

    def receive(self, result: ChunkResult) -> None:
        job, index = result.key
        out = self.outputs[job]
        if out.staging is not None and result.segment is not None:
            atomic_write_bytes(out.staging / f"{index:06d}.mp4", result.segment)
        pairs = self.images[job]
        for offset, image in enumerate(result.images):
            save_rgb(pairs[result.first + offset][1], image)
        self.results[result.key] = _without_pixels(result)
        out.done += 1
        out.frames += result.stats.frames
        self._finish(out)

    def _finish(self, out: _Output) -> None:
        if out.written or not out.finished_cutting or out.done < out.cut:
            return
        if out.staging is not None and out.cut:
            segments = [out.staging / f"{index:06d}.mp4" for index in range(out.cut)]
            join_segments(segments, out.spec.output, out.fps, audio_from=out.spec.source)
            partial_path(out.spec.output).unlink(missing_ok=True)  # an earlier run's, now stale
            shutil.rmtree(out.staging, ignore_errors=True)
            out.staging = None
        out.written = True

    def keep_partial(self) -> list[tuple[Path, int]]:
        """After a failure: the leading chunks back of each unfinished video, joined into its
        ``NAME.partial.EXT`` as ``adasr run`` keeps them; (file, frames) of each one kept."""
        kept = []
        for out in self.outputs:
            if out.staging is None or out.written:
                continue
            prefix = []
            for index in itertools.count():
                segment = out.staging / f"{index:06d}.mp4"
                if not segment.is_file():
                    break
                prefix.append(segment)
            if prefix:
                target = partial_path(out.spec.output)
                with contextlib.suppress(OSError, MediaError):
                    kept.append((target, join_segments(prefix, target, out.fps,
                                                       audio_from=out.spec.source)))
        return kept

    def clean(self) -> None:
        for out in self.outputs:
            if out.staging is not None:
                shutil.rmtree(out.staging, ignore_errors=True)
                out.staging = None

    def progress(self, board: Mapping[ChunkKey, tuple[Attempt, ...]]) -> JobProgress:
        running = {key: attempts[-1] for key, attempts in board.items()
                   if key not in self.results}
        done = sum(result.stats.frames for result in self.results.values())
        return JobProgress(
            frames_done=done + sum(attempt.frames for attempt in running.values()),
            frames_total=self.total, chunks_done=len(self.results),
            chunks_cut=sum(out.cut for out in self.outputs),
            retried=sum(len(attempts) > 1 for attempts in board.values()),
            seconds=time.perf_counter() - self.start, running=running)


def _without_pixels(result: ChunkResult) -> ChunkResult:
    """``result`` without its segment bytes and images (kept for the report)."""
    return dataclasses.replace(result, segment=None, images=())


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def run_job(inputs: Sequence[ClusterInput], settings: DispatchSettings, *, workers: int,
            chunk_frames: int = DEFAULT_CHUNK_FRAMES, limit: int | None = None,
            retries: int = DEFAULT_RETRIES, digests: bool = False,
            on_progress: Callable[[JobProgress], None] | None = None,
            poll_s: float = _POLL_S) -> JobReport:
    """Upscale ``inputs`` on the connected Ray cluster (see :func:`connect` and the module
    docstring) with ``workers`` dispatcher actors, each reserving ``settings.threads`` CPUs (1
    when None); ``limit``: the first frames of each input only. ``on_progress`` is called on
    the driver about every ``poll_s`` seconds and after every chunk. ``digests``: the report
    holds the sha256 of every SR frame's RGB bytes, before encoding."""
    import ray
    from ray.util import ActorPool

    if workers < 1 or chunk_frames < 1 or retries < 0:
        raise ConfigError(f"need workers >= 1, chunk frames >= 1 and retries >= 0; got "
                          f"{workers}, {chunk_frames} and {retries}")
    settings = dataclasses.replace(settings, bundle=settings.bundle.resolve())  # for workers
    job = _Job(inputs, settings, chunk_frames, limit, digests)
    board_name = f"adasr-progress-{uuid.uuid4().hex}"
    board = ray.remote(num_cpus=0)(ProgressBoard).options(name=board_name).remote()
    actor = ray.remote(num_cpus=settings.threads or 1, max_restarts=retries,
                       max_task_retries=retries)(ChunkWorker)
    actors = [actor.remote(settings, board_name) for _ in range(workers)]
    pool = ActorPool(actors)
    chunks = job.chunks()
    in_flight = 0

    def report() -> None:
        if on_progress is not None:
            on_progress(job.progress(ray.get(board.snapshot.remote())))

    failure: AdasrError | None = None  # an input failed: finish the chunks out, then raise
    try:
        more = True
        while True:
            while more and in_flight <= workers:  # one chunk ready beyond the busy workers
                try:
                    item = next(chunks, None)
                except AdasrError as error:
                    failure, item = error, None
                if item is None:
                    more = False
                    break
                chunk, frames = item
                pool.submit(lambda worker, task: worker.upscale.remote(*task),
                            (chunk, ray.put(frames)))
                in_flight += 1
                del frames
            if not pool.has_next():
                break
            try:
                result = pool.get_next_unordered(timeout=poll_s)
            except TimeoutError:
                report()
                continue
            except ray.exceptions.RayError as err:
                raise _actor_error(err) from err
            in_flight -= 1
            job.receive(result)
            report()
        if failure is not None:
            raise failure
        snapshot = ray.get(board.snapshot.remote())
    except (Exception, KeyboardInterrupt) as error:
        kept = job.keep_partial()
        note = ("; ".join(f"the {frames} frames done are in {path}" for path, frames in kept)
                or "no video frame was kept")
        if isinstance(error, AdasrError):
            raise type(error)(f"{error}; {note}") from error
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(note) from error
        raise
    finally:
        job.clean()
        for handle in (*actors, board):
            ray.kill(handle)
    return _report(job, snapshot, workers)


def _report(job: _Job, board: Mapping[ChunkKey, tuple[Attempt, ...]], workers: int) -> JobReport:
    ordered = [job.results[key] for key in sorted(job.results)]
    histogram: Counter[str] = Counter()
    for result in ordered:
        histogram.update(result.stats.histogram)
    records = tuple(record for result in ordered for record in result.stats.records)
    return JobReport(
        outputs=tuple((out.spec.output, out.frames) for out in job.outputs), records=records,
        histogram=dict(histogram), wall_s=time.perf_counter() - job.start,
        retried=sum(len(attempts) > 1 for attempts in board.values()), workers=workers,
        chunk_workers={result.key: result.worker for result in ordered},
        digests=tuple(digest for result in ordered for digest in result.digests))

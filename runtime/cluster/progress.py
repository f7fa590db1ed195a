"""Progress of a cluster job: what the workers report, and the snapshot the driver shows.

Workers tell a :class:`ProgressBoard` actor when they start a chunk (each attempt: a chunk whose
worker died is started again by Ray's retry) and after every frame, with fire-and-forget calls.
The driver reads a :meth:`ProgressBoard.snapshot` while it waits for results, and turns it into
a :class:`JobProgress` for its callback (the CLI draws a bar on a terminal, lines otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Attempt", "JobProgress", "ProgressBoard"]

ChunkKey = tuple[int, int]


@dataclass(frozen=True)
class Attempt:
    """One start of a chunk on a worker, and the frames it has done so far."""

    worker: str  # host:pid
    frames: int


class ProgressBoard:
    """Attempts per chunk (a Ray actor; see the module docstring)."""

    def __init__(self) -> None:
        self._attempts: dict[ChunkKey, list[Attempt]] = {}

    def started(self, key: ChunkKey, worker: str) -> None:
        self._attempts.setdefault(key, []).append(Attempt(worker, 0))

    def advanced(self, key: ChunkKey) -> None:
        attempts = self._attempts[key]
        attempts[-1] = Attempt(attempts[-1].worker, attempts[-1].frames + 1)

    def snapshot(self) -> dict[ChunkKey, tuple[Attempt, ...]]:
        return {key: tuple(attempts) for key, attempts in self._attempts.items()}


@dataclass(frozen=True)
class JobProgress:
    """The whole job at one moment."""

    frames_done: int  # frames of finished chunks plus those done in running chunks
    frames_total: int  # 0: not known yet
    chunks_done: int
    chunks_cut: int  # chunks the driver has cut so far
    retried: int  # chunks started more than once
    seconds: float  # since the job started
    running: dict[ChunkKey, Attempt]  # the latest attempt of each unfinished chunk

    @property
    def fps(self) -> float:
        return self.frames_done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        total = f"/{self.frames_total}" if self.frames_total else ""
        percent = (f" ({100 * self.frames_done / self.frames_total:.0f}%)"
                   if self.frames_total else "")
        return (f"{self.frames_done}{total} frames{percent}, {self.fps:.2f} fps, chunks "
                f"{self.chunks_done}/{self.chunks_cut} done, {len(self.running)} running, "
                f"{self.retried} retried, {self.seconds:.0f} s")

"""Video files through PyAV: probe, decode to RGB frames, encode H.264 with the input's audio.

Decoding converts every pixel format (gray, RGBA, 4:2:2, 10-bit ...) to 8-bit RGB with swscale,
honouring the frame's colour-matrix tag (untagged: BT.601); alpha is dropped.

Encoding writes H.264 (libx264; ``mpeg4`` where this PyAV build has no libx264, see
:func:`video_encoder`) in 4:2:0 (``yuv420p``), tagged BT.709 limited range, at a constant frame
rate (the input's average rate: frame ``i`` is shown at ``i / fps``). 4:2:0 needs even sizes: an
odd width or height is padded by repeating the last column or row, so an odd W x H frame is
stored as (W+1) x (H+1) at most. The input's audio is copied packet for packet (no re-encoding),
interleaved with the video and trimmed to the frames written.

Fault policy (temp name + rename, plus a playable partial file): a :class:`VideoWriter` writes to
a hidden temp file beside its output (a new name: ``mkstemp``). Only a successful
:meth:`VideoWriter.commit` renames it to the output name, so a file with that name is always
complete. On an error, Ctrl-C, SIGTERM or SIGHUP, :meth:`VideoWriter.abort` finishes the frames
already written into a valid, playable file named ``NAME.partial.EXT`` (see :func:`partial_path`;
``NAME.partial-2.EXT`` ... when that name exists: an existing file is never replaced or deleted)
and returns that path; with no frame written it leaves nothing. Both hold further signals until
they are done (:func:`runtime.outputs.deferred_signals`). A killed process leaves only the hidden
``.NAME.*.part.EXT`` temp file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from runtime.errors import ConfigError, MediaError, did_you_mean
from runtime.outputs import deferred_signals, place_new

__all__ = ["EncoderSettings", "VideoInfo", "VideoWriter", "partial_path", "probe", "read_frames",
           "video_encoder"]

Frame = npt.NDArray[np.uint8]

DEFAULT_FPS = Fraction(25)  # when a stream declares no frame rate at all
# Frames a container may declare beyond those that decode (edit lists hiding priming frames)
# before a short decode counts as truncation.
_DECLARED_FRAME_SLACK = 2
_BT709 = 1  # AVCOL_SPC / AVCOL_PRI / AVCOL_TRC value of ITU-R BT.709
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG
_FILE_MODE = 0o644  # mkstemp makes 0600; a video should be readable like any other file


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` reads from the first video stream of a file."""

    width: int
    height: int
    fps: Fraction
    frames: int  # declared by the container; 0 = unknown
    has_audio: bool
    pix_fmt: str
    codec: str


@dataclass(frozen=True)
class EncoderSettings:
    """How :class:`VideoWriter` encodes: CRF (constant quality) unless a bitrate is given."""

    crf: int = 18  # x264 scale 0 (lossless) .. 51; 18 is visually lossless for most content
    bitrate: int | None = None  # bits per second; overrides crf
    preset: str = "fast"  # x264 speed/size trade-off
    codec: str | None = None  # an FFmpeg video encoder (h264_nvenc ...); None: video_encoder()

    def __post_init__(self) -> None:
        kind = None if self.codec is None else _encoder_kind(self.codec)
        if self.codec is not None and kind != "video":
            allowed = video_encoders()
            what = (f"an {kind} encoder, not a video encoder" if kind is not None else
                    f"not a video encoder of this PyAV build{did_you_mean(self.codec, allowed)}")
            raise ConfigError(f"--codec {self.codec!r} is {what}; video encoders here: "
                              f"{', '.join(allowed)}")
        if isinstance(self.crf, bool) or not isinstance(self.crf, int) or not 0 <= self.crf <= 51:
            raise ConfigError(f"crf must be an integer in 0..51, got {self.crf!r}")
        if self.bitrate is not None and (not isinstance(self.bitrate, int) or self.bitrate <= 0):
            raise ConfigError(f"bitrate must be a positive number of bits/s, got {self.bitrate!r}")


def _encoder_kind(name: str) -> str | None:
    """``"video"``, ``"audio"`` ... for an FFmpeg encoder name; None when there is none."""
    try:
        return str(av.codec.Codec(name, "w").type)
    except ValueError:  # UnknownCodecError
        return None


_COMMON_VIDEO_ENCODERS = ("libx264", "h264_nvenc", "libx265", "hevc_nvenc", "libvpx-vp9",
                          "libsvtav1", "libaom-av1", "mpeg4")


def video_encoders() -> tuple[str, ...]:
    """The usual video encoders that this PyAV build has (for messages)."""
    return tuple(name for name in _COMMON_VIDEO_ENCODERS if _encoder_kind(name) == "video")


def video_encoder() -> str:
    """``libx264`` when this PyAV build has it, else ``mpeg4`` (callers should say so)."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def partial_path(path: Path) -> Path:
    """Where an interrupted or failed write keeps its frames: ``NAME.partial.EXT``."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _open_input(path: Path) -> Any:
    """An input container holding a video stream, or MediaError naming the problem."""
    if not path.is_file():
        raise MediaError(f"video file not found: {path}" if not path.exists()
                         else f"{path} is not a file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise MediaError(f"cannot read video {path}: not a video, or corrupt or truncated "
                         f"({err.__class__.__name__})") from err
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path} has no video stream")
    return container


def _rate(stream: Any) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    return DEFAULT_FPS


def probe(path: Path) -> VideoInfo:
    """Size, frame rate, declared frame count, audio presence and format of ``path``."""
    with _open_input(path) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        return VideoInfo(width=int(context.width), height=int(context.height),
                         fps=_rate(stream), frames=int(stream.frames or 0),
                         has_audio=bool(container.streams.audio),
                         pix_fmt=str(context.pix_fmt or "unknown"), codec=str(context.name))


def read_frames(path: Path, *, limit: int | None = None) -> Generator[Frame, None, None]:
    """Decode the first video stream of ``path`` as H x W x 3 uint8 RGB frames.

    Stops after ``limit`` frames when given; ``close()`` the generator to stop early and close
    the file. Raises MediaError when the data is corrupt or the file is truncated (the frames
    before the fault have been yielded already).
    """
    container = _open_input(path)
    count = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = int(stream.frames or 0)
        if limit is not None and limit <= 0:
            return
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
                count += 1
                if limit is not None and count >= limit:
                    return
        except av.error.FFmpegError as err:
            raise MediaError(f"{path} is corrupt or truncated: decoding failed after {count} "
                             f"frames ({err.__class__.__name__})") from err
        if count == 0:
            raise MediaError(f"{path} has a video stream but no frame decodes")
        if count + _DECLARED_FRAME_SLACK < declared:
            raise MediaError(f"{path} is truncated: {count} of the {declared} declared frames "
                             "decode")
    finally:
        container.close()


class _AudioCopy:
    """The audio packets of an input file, re-addressed to an output container, in order."""

    def __init__(self, source: Any, output: Any) -> None:
        self._input = source
        audio = source.streams.audio[0]
        video = source.streams.video[0]
        self._stream = output.add_stream_from_template(audio)
        start = video.start_time if video.start_time is not None else 0
        # Shift audio by the video's start so that both start at 0 in the output.
        self._shift = int(round(Fraction(start) * video.time_base / audio.time_base))
        self._packets = iter(self._input.demux(audio))
        self._pending: Any = None

    @classmethod
    def start(cls, source: Path, output: Any, video_codec: str) -> _AudioCopy | None:
        """An audio copy from ``source`` into ``output``; None when it has no audio."""
        container = _open_input(source)
        if not container.streams.audio:
            container.close()
            return None
        codec = container.streams.audio[0].codec_context.name
        supported = output.supported_codecs  # trusted where it knows our video codec (not ts)
        if video_codec in supported and codec not in supported:
            container.close()
            raise MediaError(f"the {codec} audio of {source} cannot be copied into the "
                             f"{output.format.name} container: write a .mkv")
        return cls(container, output)

    def packets_until(self, seconds: Fraction) -> Iterator[Any]:
        """The next audio packets that start before ``seconds``, ready to mux."""
        while True:
            packet = self._pending if self._pending is not None else next(self._packets, None)
            self._pending = None
            if packet is None:
                return
            if packet.pts is None or packet.dts is None:  # demuxer flush packet
                continue
            if (packet.pts - self._shift) * packet.time_base >= seconds:
                self._pending = packet
                return
            packet.pts -= self._shift
            packet.dts -= self._shift
            packet.stream = self._stream
            yield packet

    def close(self) -> None:
        self._input.close()


class VideoWriter:
    """Encode H x W x 3 uint8 RGB frames into ``path`` (see the module docstring).

    Use it as a context manager: a clean exit commits (renames the temp file to ``path``), an
    exception aborts (keeps the written frames in :func:`partial_path`, see :attr:`kept`). The
    frame size is taken from the first frame; every frame must have it.
    """

    def __init__(self, path: Path, fps: Fraction, *, audio_from: Path | None = None,
                 settings: EncoderSettings | None = None) -> None:
        if fps <= 0:
            raise ConfigError(f"frame rate must be positive, got {fps}")
        self.path = path
        self.fps = Fraction(fps)
        self.settings = settings or EncoderSettings()
        self.codec = self.settings.codec or video_encoder()
        self.frames_written = 0
        self.kept: Path | None = None  # where the frames ended up after commit/abort
        self._audio_from = audio_from
        self._size: tuple[int, int] | None = None  # H x W of the frames given
        self._stream: Any = None
        self._audio: _AudioCopy | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}",
                                        dir=path.parent)
        os.close(handle)
        os.chmod(name, _FILE_MODE)
        self._temp = Path(name)
        try:
            self._container: Any = av.open(name, "w")
        except (av.error.FFmpegError, ValueError) as err:
            self._temp.unlink(missing_ok=True)
            raise MediaError(f"cannot write video {path}: no container format for suffix "
                             f"{path.suffix!r} (use .mp4, .mkv or .mov)") from err
        self._closed = False

    def _start(self, height: int, width: int) -> None:
        settings = self.settings
        options = {"preset": settings.preset} if self.codec == "libx264" else {}
        if settings.bitrate is None and self.codec == "libx264":
            options["crf"] = str(settings.crf)
        stream = self._container.add_stream(self.codec, rate=self.fps, options=options)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = 1 / self.fps
        if settings.bitrate is not None:
            stream.bit_rate = settings.bitrate
        elif self.codec != "libx264":  # no CRF outside x264: about 0.25 bit per pixel
            stream.bit_rate = int(stream.width * stream.height * self.fps / 4)
        context = stream.codec_context
        context.colorspace = context.color_primaries = context.color_trc = _BT709
        context.color_range = _LIMITED_RANGE
        self._stream = stream
        self._size = (height, width)
        if self._audio_from is not None:
            self._audio = _AudioCopy.start(self._audio_from, self._container, self.codec)

    def write(self, frame: Frame) -> None:
        """Encode the next frame (H x W x 3 uint8)."""
        if self._closed:
            raise MediaError(f"video {self.path} is already closed")
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise MediaError(f"video frames must be H x W x 3 uint8, got {frame.shape} "
                             f"{frame.dtype}")
        height, width = frame.shape[:2]
        if self._size is not None and self._size != (height, width):
            raise MediaError(f"frame {self.frames_written} of {self.path} is {width} x {height}, "
                             f"the video is {self._size[1]} x {self._size[0]}")
        if height % 2 or width % 2:
            frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        with self._av_errors():
            if self._size is None:
                self._start(height, width)
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture = picture.reformat(format="yuv420p", dst_colorspace=_BT709,
                                       dst_color_range=_LIMITED_RANGE)
            picture.pts = self.frames_written
            picture.time_base = 1 / self.fps
            self._mux(self._stream.encode(picture))
            self.frames_written += 1
            if self._audio is not None:
                self._mux(self._audio.packets_until(self.frames_written / self.fps))

    @contextmanager
    def _av_errors(self) -> Iterator[None]:
        """Report PyAV/FFmpeg failures (encoder, muxer, disk) as MediaError naming the file."""
        try:
            yield
        except (av.error.FFmpegError, ValueError) as err:
            raise MediaError(f"cannot write video {self.path} with {self.codec}: "
                             f"{err.__class__.__name__}: {err}") from err

    def _mux(self, packets: Iterable[Any]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _finish(self) -> None:
        """Flush the encoder and the audio up to the end of the video, write the trailer."""
        self._closed = True
        try:
            with self._av_errors():
                if self._stream is not None:
                    self._mux(self._stream.encode(None))
                if self._audio is not None:
                    self._mux(self._audio.packets_until(self.frames_written / self.fps))
        finally:
            if self._audio is not None:
                self._audio.close()
            with self._av_errors():
                self._container.close()

    def commit(self) -> Path:
        """Finish the file and rename it to :attr:`path`; MediaError when no frame was written."""
        if self.frames_written == 0:
            self.abort()
            raise MediaError(f"no frame was written to {self.path}")
        with deferred_signals():
            try:
                self._finish()
            except BaseException:
                self._temp.unlink(missing_ok=True)
                raise
            os.replace(self._temp, self.path)
            self.kept = self.path
        return self.path

    def abort(self) -> Path | None:
        """Keep the frames written so far in a playable :func:`partial_path` file (returned), or
        leave nothing when there are none or the file cannot be finished."""
        if self._closed:
            return self.kept
        with deferred_signals(reraise=False):
            try:
                self._finish()
            except (OSError, MediaError):
                self.frames_written = 0
            if self.frames_written == 0:
                self._temp.unlink(missing_ok=True)
                return None
            try:
                self.kept = place_new(self._temp, partial_path(self.path))
            except OSError:
                self._temp.unlink(missing_ok=True)
                return None
        return self.kept

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

"""Join the encoded chunk segments of one video into its output file, with the input's audio.

The segments are H.264 MP4 files encoded with the same settings (so the same stream parameters)
whose frame ``i`` is shown at ``i / fps``. Their packets are copied, not re-encoded, into one
container with every timestamp shifted by the frames before the segment, so frame ``n`` of the
output is shown at ``n / fps`` exactly as :class:`runtime.video.VideoWriter` writes a whole clip;
the input's audio packets are interleaved as that writer does and trimmed to the video. The file
is written under a hidden temporary name beside the output and renamed only when complete.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from runtime.errors import MediaError
from runtime.video import _AudioCopy

__all__ = ["join_segments"]

_FILE_MODE = 0o644


def _shift(frames: int, fps: Fraction, time_base: Fraction) -> int:
    ticks = Fraction(frames) / fps / time_base
    if ticks.denominator != 1:
        raise MediaError(f"a segment time base of {time_base} cannot place frame {frames} at "
                         f"{fps} fps exactly")
    return int(ticks)


def _copy_segment(segment: Path, output: Any, stream: Any, extradata: bytes | None,
                  before: int, fps: Fraction, audio: _AudioCopy | None) -> int:
    """Mux the packets of ``segment`` after ``before`` frames; the number of frames copied."""
    frames = 0
    with av.open(str(segment)) as source:
        video = source.streams.video[0]
        if video.codec_context.extradata != extradata:
            raise MediaError(f"segment {segment.name} was encoded with other stream parameters "
                             "than the first; the chunks cannot be joined")
        if video.time_base is None:
            raise MediaError(f"segment {segment.name} has no time base")
        shift = _shift(before, fps, Fraction(video.time_base))
        for packet in source.demux(video):
            if packet.dts is None or packet.pts is None:  # demuxer flush packet
                continue
            packet.pts += shift
            packet.dts += shift
            packet.stream = stream
            output.mux(packet)
            frames += 1
            if audio is not None:
                for sound in audio.packets_until((before + frames) / fps):
                    output.mux(sound)
    return frames


def join_segments(segments: Sequence[Path], output: Path, fps: Fraction, *,
                  audio_from: Path | None = None) -> int:
    """Write ``segments`` in order into ``output`` with the audio of ``audio_from``; returns the
    number of frames. ``output`` appears only when the whole file is written."""
    if not segments:
        raise MediaError(f"no segment to join into {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=f".part{output.suffix}",
                                    dir=output.parent)
    os.close(handle)
    temp = Path(name)
    try:
        os.chmod(temp, _FILE_MODE)
        frames = 0
        with av.open(str(segments[0])) as first, av.open(name, "w") as container:
            template = first.streams.video[0]
            stream = container.add_stream_from_template(template)
            extradata = template.codec_context.extradata
            audio = (None if audio_from is None
                     else _AudioCopy.start(audio_from, container, template.codec_context.name))
            try:
                for segment in segments:
                    frames += _copy_segment(segment, container, stream, extradata, frames, fps,
                                            audio)
                if audio is not None:
                    for sound in audio.packets_until(Fraction(frames) / fps):
                        container.mux(sound)
            finally:
                if audio is not None:
                    audio.close()
        os.replace(temp, output)
    except av.error.FFmpegError as err:
        temp.unlink(missing_ok=True)
        raise MediaError(f"cannot join the chunks of {output}: {err.__class__.__name__}: "
                         f"{err}") from err
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return frames

"""runtime.video: probe, decode any pixel format to RGB, H.264 writer, audio copy, faults."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest

from runtime.errors import ConfigError, MediaError
from runtime.video import (
    EncoderSettings,
    VideoWriter,
    partial_path,
    probe,
    read_frames,
    video_encoder,
)

Frame = npt.NDArray[np.uint8]
CARPHONE = "video/carphone_pristine.mp4"
BUNNY = "video/bigbuckbunny.mp4"


def psnr(a: Frame, b: Frame) -> float:
    """PSNR over all RGB samples, in dB."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


def smooth_frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> list[Frame]:
    """Smooth waves drifting a little per frame, mostly luma with a little colour (what a codec
    with 4:2:0 chroma keeps well)."""
    phases = np.random.default_rng(seed).random(3) * 2 * np.pi
    y, x = np.mgrid[:height, :width]
    frames = []
    for index in range(count):
        luma = 80 * np.sin(x / 9 + y / 13 + 0.3 * index)
        waves = [128 + luma + 30 * np.sin(x / (17 + c) + y / (23 - c) + phases[c] + 0.2 * index)
                 for c in range(3)]
        frames.append(np.round(np.stack(waves, axis=2)).astype(np.uint8))
    return frames


def write_clip(path: Path, frames: Sequence[Frame], *, fps: Fraction = Fraction(25),
               codec: str = "libx264", pix_fmt: str = "yuv420p",
               options: dict[str, str] | None = None,
               container_options: dict[str, str] | None = None) -> Path:
    """Encode RGB frames with PyAV directly (independent of VideoWriter)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def truncated_clip(folder: Path, frames: int = 60, keep: float = 0.75) -> Path:
    """A faststart MP4 (index first, so its start still decodes) cut to ``keep`` of its bytes."""
    whole = write_clip(folder / "whole.mp4", smooth_frames(frames),
                       container_options={"movflags": "faststart"})
    data = whole.read_bytes()
    cut = folder / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


def test_writer_round_trip_keeps_size_rate_and_pixels(tmp_path: Path) -> None:
    frames = smooth_frames(6)
    fps = Fraction(30000, 1001)
    with VideoWriter(tmp_path / "out.mp4", fps) as writer:
        for frame in frames:
            writer.write(frame)
    info = probe(tmp_path / "out.mp4")
    assert (info.width, info.height, info.fps, info.frames) == (64, 48, fps, 6)
    assert (info.codec, info.pix_fmt, info.has_audio) == ("h264", "yuv420p", False)
    back = list(read_frames(tmp_path / "out.mp4"))
    assert len(back) == 6 and back[0].shape == (48, 64, 3) and back[0].dtype == np.uint8
    assert min(psnr(a, b) for a, b in zip(back, frames, strict=True)) > 38.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temp file left


def test_limit_reads_the_first_frames(shared_file: Callable[[str], Path]) -> None:
    clip = shared_file(CARPHONE)
    info = probe(clip)
    assert (info.width, info.height, info.fps, info.frames) == (176, 144, Fraction(30000, 1001),
                                                                120)
    assert len(list(read_frames(clip, limit=7))) == 7


def test_odd_sizes_are_padded_by_the_edge_pixels(tmp_path: Path) -> None:
    frame = smooth_frames(1, height=48, width=72)[0][:45, :67]
    with VideoWriter(tmp_path / "odd.mp4", Fraction(25)) as writer:
        writer.write(frame)
    info = probe(tmp_path / "odd.mp4")
    assert (info.width, info.height) == (68, 46)
    back = next(read_frames(tmp_path / "odd.mp4"))
    assert psnr(back[:45, :67], frame) > 38.0
    assert np.abs(back[:45, 67].astype(int) - back[:45, 66]).mean() < 3  # the repeated column


@pytest.mark.parametrize(("codec", "pix_fmt", "suffix"), [
    ("ffv1", "gray", ".mkv"),
    ("ffv1", "bgra", ".mkv"),
    ("ffv1", "yuv444p", ".mkv"),
    ("libx264", "yuv420p10le", ".mp4"),
    ("libx264", "yuv422p", ".mp4"),
])
def test_any_pixel_format_decodes_to_rgb24(tmp_path: Path, codec: str, pix_fmt: str,
                                           suffix: str) -> None:
    frames = smooth_frames(3)
    if pix_fmt == "gray":  # a gray source: every channel the same
        frames = [np.repeat(f[:, :, :1], 3, axis=2) for f in frames]
    options = {"crf": "4"} if codec == "libx264" else {}
    clip = write_clip(tmp_path / f"clip{suffix}", frames, codec=codec, pix_fmt=pix_fmt,
                      options=options)
    assert probe(clip).pix_fmt == pix_fmt
    back = list(read_frames(clip))
    assert len(back) == 3
    assert all(b.shape == (48, 64, 3) and b.dtype == np.uint8 for b in back)
    if pix_fmt == "bgra":  # lossless RGB: exact
        assert all(np.array_equal(b, f) for b, f in zip(back, frames, strict=True))
    else:
        assert min(psnr(b, f) for b, f in zip(back, frames, strict=True)) > 35.0
    if pix_fmt == "gray":
        assert np.array_equal(back[0][:, :, 0], back[0][:, :, 2])


def test_audio_is_copied_and_trimmed_to_the_video(tmp_path: Path,
                                                  shared_file: Callable[[str], Path]) -> None:
    source = shared_file(BUNNY)
    fps = probe(source).fps
    frames = [f[::8, ::8].copy() for f in read_frames(source, limit=10)]
    with VideoWriter(tmp_path / "a.mp4", fps, audio_from=source) as writer:
        for frame in frames:
            writer.write(frame)
    info = probe(tmp_path / "a.mp4")
    assert (info.frames, info.fps, info.has_audio) == (10, Fraction(25), True)
    with av.open(str(tmp_path / "a.mp4")) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        seconds = float(audio.duration * audio.time_base)
    assert abs(seconds - 10 / 25) <= 1024 / 48000 + 1e-6  # within one AAC packet


def test_audio_the_output_container_cannot_hold_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "opus.mkv"
    with av.open(str(source), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("libopus", rate=48000, layout="mono")
        for index, pixels in enumerate(smooth_frames(3)):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
        for index in range(6):
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.int16), format="s16",
                                               layout="mono")
            sound.sample_rate, sound.pts = 48000, index * 960
            out.mux(audio.encode(sound))
        out.mux(video.encode(None))
        out.mux(audio.encode(None))
    assert probe(source).has_audio
    with pytest.raises(MediaError, match="the opus audio of .*opus.mkv cannot be copied into the "
                       "avi container: write a .mkv"), \
            VideoWriter(tmp_path / "out.avi", Fraction(25), audio_from=source) as writer:
        writer.write(smooth_frames(1)[0])
    with VideoWriter(tmp_path / "out.mkv", Fraction(25), audio_from=source) as writer:
        writer.write(smooth_frames(1)[0])
    assert probe(tmp_path / "out.mkv").has_audio
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opus.mkv", "out.mkv"]


def test_abort_keeps_a_playable_partial_file(tmp_path: Path) -> None:
    output = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt), VideoWriter(output, Fraction(25)) as writer:
        for index, frame in enumerate(smooth_frames(8)):
            if index == 5:
                raise KeyboardInterrupt
            writer.write(frame)
    assert writer.kept == partial_path(output) == tmp_path / "out.partial.mp4"
    assert not output.exists()
    assert probe(writer.kept).frames == 5
    assert len(list(read_frames(writer.kept))) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial.mp4"]


def test_nothing_is_left_without_frames(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "none.mp4", Fraction(25))
    assert writer.abort() is None
    with pytest.raises(MediaError, match="no frame was written"), \
            VideoWriter(tmp_path / "empty.mp4", Fraction(25)):
        pass
    assert list(tmp_path.iterdir()) == []


def test_truncated_stream_raises_after_the_good_frames(tmp_path: Path) -> None:
    cut = truncated_clip(tmp_path)
    assert probe(cut).frames == 60
    decoded: list[Frame] = []
    with pytest.raises(MediaError, match=r"cut\.mp4 is (corrupt or )?truncated") as error:
        decoded.extend(read_frames(cut))
    assert 5 <= len(decoded) < 60
    assert str(len(decoded)) in str(error.value)
    assert "\n" not in str(error.value)


def test_unreadable_inputs_raise_one_line_media_errors(
        tmp_path: Path, shared_file: Callable[[str], Path]) -> None:
    half = tmp_path / "half.mp4"  # index at the end: a truncated copy has none
    data = shared_file(CARPHONE).read_bytes()
    half.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "noise.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    cases = {half: "not a video, or corrupt or truncated", garbage: "not a video",
             tmp_path / "missing.mp4": "video file not found", tmp_path: "is not a file"}
    for path, message in cases.items():
        with pytest.raises(MediaError, match=message) as error:
            probe(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(MediaError, match=message):
            next(read_frames(path))


def test_a_file_without_video_is_refused(tmp_path: Path,
                                         shared_file: Callable[[str], Path]) -> None:
    sound = tmp_path / "sound.m4a"
    with av.open(str(shared_file(BUNNY))) as source, av.open(str(sound), "w") as out:
        stream = out.add_stream_from_template(source.streams.audio[0])
        for index, packet in enumerate(source.demux(source.streams.audio[0])):
            if packet.dts is None or index > 20:
                continue
            packet.stream = stream
            out.mux(packet)
    with pytest.raises(MediaError, match="has no video stream"):
        probe(sound)


def test_writer_settings_and_misuse(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="crf must be an integer in 0..51, got 60"):
        EncoderSettings(crf=60)
    with pytest.raises(ConfigError, match="bitrate"):
        EncoderSettings(bitrate=0)
    with pytest.raises(ConfigError, match="'h246' is not a video encoder of this PyAV"):
        EncoderSettings(codec="h246")
    with pytest.raises(ConfigError, match="'aac' is an audio encoder, not a video encoder; "
                       "video encoders here: libx264"):
        EncoderSettings(codec="aac")
    with pytest.raises(MediaError, match="no container format for suffix '.xyz'"):
        VideoWriter(tmp_path / "out.xyz", Fraction(25))
    frames = smooth_frames(2)
    with pytest.raises(MediaError, match="is 32 x 48, the video is 64 x 48"), \
            VideoWriter(tmp_path / "sizes.mp4", Fraction(25)) as writer:
        writer.write(frames[0])
        writer.write(frames[1][:, :32])
    with pytest.raises(MediaError, match="cannot write video .*png.mp4 with png: "), \
            VideoWriter(tmp_path / "png.mp4", Fraction(25),
                        settings=EncoderSettings(codec="png")) as writer:
        writer.write(frames[0])  # PNG takes no 4:2:0 frames: the encoder refuses to open
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sizes.partial.mp4"]
    assert video_encoder() == "libx264"  # this PyAV build has it; mpeg4 is the fallback


def test_mpeg4_fallback_and_bitrate(tmp_path: Path) -> None:
    frames = smooth_frames(4)
    for name, settings in {"m4.mp4": EncoderSettings(codec="mpeg4"),
                           "rate.mp4": EncoderSettings(bitrate=2_000_000)}.items():
        with VideoWriter(tmp_path / name, Fraction(25), settings=settings) as writer:
            for frame in frames:
                writer.write(frame)
        assert probe(tmp_path / name).frames == 4
        assert min(psnr(a, b) for a, b in zip(read_frames(tmp_path / name), frames,
                                                strict=True)) > 28.0
    assert probe(tmp_path / "m4.mp4").codec == "mpeg4"


def test_read_frames_closes_the_file_when_stopped_early(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", smooth_frames(5))
    frames = read_frames(clip)
    next(frames)
    frames.close()  # what the pipeline does when it stops; the file can be replaced now
    shutil.move(clip, tmp_path / "moved.mp4")
    assert len(list(read_frames(tmp_path / "moved.mp4"))) == 5

"""worker/video.py on real videos encoded here with PyAV; each frame carries its index."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import av
import numpy as np
import pytest

from cvserve.app.errors import InputError, PayloadTooLarge, UnsupportedMedia
from cvserve.worker.video import (
    DecodeStats,
    VideoInfo,
    VideoLimits,
    clip_starts,
    probe_video,
    read_clips,
    sampling_rate,
    upright,
)

W, H, BLOCK = 64, 48, 16  # 4 x 3 blocks of 16 px: a 12-bit frame index
LIMITS = VideoLimits()


def painted(index: int) -> np.ndarray:
    """A frame # [H, W, 3] whose 16-px blocks spell `index` in binary (white = 1)."""
    bits = np.array([(index >> k) & 1 for k in range(12)], dtype=np.uint8).reshape(3, 4)
    return np.repeat(np.repeat(bits * 255, BLOCK, 0), BLOCK, 1)[..., None].repeat(3, 2)


def index_of(rgb: np.ndarray) -> int:
    """Read back the index `painted` wrote into an upright [H, W, 3] frame."""
    means = rgb.mean(axis=2).reshape(3, BLOCK, 4, BLOCK).mean(axis=(1, 3))
    return int(sum(1 << k for k, m in enumerate(means.ravel()) if m > 128))


def encode(pts_ms: list[int], *, fmt: str = "mp4", gop: int = 12, rotation: int = 0,
           size: tuple[int, int] = (W, H), rate: int = 25) -> bytes:
    """Encode frame i (painted with i) at pts_ms[i] milliseconds with mpeg4."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.codec_context.gop_size = gop
        stream.codec_context.qmax = 4  # sharp blocks, so each index reads back exactly
        if rotation:
            stream.set_display_rotation(rotation)
        for i, pts in enumerate(pts_ms):
            rgb = painted(i)
            if size != (W, H):
                rgb = np.zeros((size[1], size[0], 3), np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def cfr(fps: int, count: int, **kwargs: object) -> bytes:
    pts = [round(i * 1000 / fps) for i in range(count)]
    return encode(pts, rate=fps, **kwargs)  # type: ignore[arg-type]


def indices(data: bytes, starts: list[float], clip_len: int, frame_rate: float,
            stats: DecodeStats | None = None) -> list[list[int]]:
    return [[index_of(f) for f in clip]
            for clip in read_clips(data, starts, clip_len, frame_rate, LIMITS, stats)]


@pytest.fixture(scope="module")
def video_30fps() -> bytes:
    return cfr(30, 90)  # 3 s


def test_probe_reports_stream(video_30fps: bytes) -> None:
    info = probe_video(video_30fps, LIMITS)
    assert (info.width, info.height, info.rotation, info.codec) == (W, H, 0, "mpeg4")
    assert info.fps == pytest.approx(30, rel=0.02)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)
    assert info.frames == 90


def test_constant_rate_samples_by_timestamp(video_30fps: bytes) -> None:
    # 10 fps from a 30 fps file: every third frame.
    assert indices(video_30fps, [0.0, 1.0], 5, 10.0) == [[0, 3, 6, 9, 12], [30, 33, 36, 39, 42]]
    # 60 fps from 30 fps: each frame shown twice.
    assert indices(video_30fps, [0.5], 4, 60.0) == [[15, 15, 16, 16]]


def test_variable_rate_samples_by_time_not_index() -> None:
    # Frames at irregular times: 0, 0.1, 0.15, 0.9, 1.0, 2.5, 2.6 s.
    data = encode([0, 100, 150, 900, 1000, 2500, 2600])
    # At 2 fps: t = 0, .5, 1, 1.5, 2, 2.5, 3 show the frame whose interval contains t.
    assert indices(data, [0.0], 7, 2.0) == [[0, 2, 4, 4, 4, 5, 6]]


def test_clip_past_the_end_repeats_last_frame(video_30fps: bytes) -> None:
    assert indices(video_30fps, [2.8], 4, 10.0) == [[84, 87, 89, 89]]


def test_seek_decodes_a_fraction_of_a_long_video() -> None:
    fps, total = 2, 1200  # 10 minutes, a keyframe every 20 frames (10 s)
    data = cfr(fps, total, gop=20)
    info = probe_video(data, LIMITS)
    assert info.duration_s == pytest.approx(600, abs=1)
    starts = clip_starts(info, clip_len=4, frame_rate=2.0, num_clips=10)
    stats = DecodeStats()
    clips = indices(data, starts, 4, 2.0, stats)
    expected = [[math.floor(s * fps + 1e-6) + i for i in range(4)] for s in starts]
    assert clips == expected
    assert stats.seeks >= 9
    assert stats.frames_decoded < 0.25 * total


def test_frames_decoded_limit_is_413(video_30fps: bytes) -> None:
    limits = VideoLimits(max_frames_decoded=20)
    with pytest.raises(PayloadTooLarge, match="max_frames_decoded"):
        list(read_clips(video_30fps, [0.0], 10, 5.0, limits))


def test_rotated_video_comes_out_upright() -> None:
    data = cfr(10, 5, fmt="mp4", rotation=90)
    info = probe_video(data, LIMITS)
    assert (info.rotation, info.width, info.height) == (90, H, W)
    [clip] = read_clips(data, [0.0], 5, 10.0, LIMITS)
    assert clip.shape == (5, W, H, 3)  # [T, H, W, 3] upright: the stored 64x48 turned
    assert [index_of(np.rot90(f, k=-1)) for f in clip] == [0, 1, 2, 3, 4]


def test_upright_rotates_counter_clockwise() -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 2] = 255  # top right
    assert upright(rgb, 0) is rgb
    assert upright(rgb, 90).shape == (3, 2, 3) and upright(rgb, 90)[0, 0, 0] == 255
    assert upright(rgb, 180)[1, 0, 0] == 255
    assert upright(rgb, -90)[2, 1, 0] == 255


def test_mkv_reads_the_same(video_30fps: bytes) -> None:
    data = cfr(30, 30, fmt="matroska")
    info = probe_video(data, LIMITS)
    assert (info.codec, info.fps) == ("mpeg4", pytest.approx(30, rel=0.02))
    assert indices(data, [0.2], 3, 10.0) == [[6, 9, 12]]


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(painted(5)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


@pytest.mark.parametrize(("name", "make", "message"), [
    ("random", lambda: np.random.default_rng(0).bytes(5000), "not a video container"),
    ("png", png_bytes, "still image"),
    ("wav", wav_bytes, "audio-only"),
    # The MP4 muxer writes its index (moov) last: half a file holds no video stream.
    ("truncated", lambda: cfr(30, 30)[: len(cfr(30, 30)) // 2], "truncated or corrupt"),
])
def test_not_a_video_is_415(name: str, make: object, message: str) -> None:
    with pytest.raises(UnsupportedMedia, match=message) as exc:
        probe_video(make(), LIMITS)  # type: ignore[operator]
    assert exc.value.status == 415


def test_truncated_stream_yields_what_decodes() -> None:
    # Matroska keeps its header in front: half the bytes still hold the first frames.
    data = cfr(30, 60, fmt="matroska")
    half = data[: len(data) // 2]
    probe_video(half, LIMITS)
    stats = DecodeStats()
    [clip] = read_clips(half, [0.0], 3, 10.0, LIMITS, stats)
    assert [index_of(f) for f in clip] == [0, 3, 6]
    # The header still declares 2 s; a clip at 1.9 s lies past what decodes.
    assert probe_video(half, LIMITS).duration_s == pytest.approx(2.0, abs=0.05)
    with pytest.raises(UnsupportedMedia, match="truncated"):
        list(read_clips(half, [1.9], 1, 10.0, LIMITS))


def test_limits_are_413(video_30fps: bytes) -> None:
    with pytest.raises(PayloadTooLarge, match="max_duration_s"):
        probe_video(video_30fps, VideoLimits(max_duration_s=2.0))
    with pytest.raises(PayloadTooLarge, match="max_pixels"):
        probe_video(video_30fps, VideoLimits(max_pixels=W * H - 1))
    with pytest.raises(PayloadTooLarge, match="max_bytes"):
        probe_video(video_30fps, VideoLimits(max_bytes=100))


INFO = VideoInfo(duration_s=10.0, fps=30.0, width=W, height=H, rotation=0, codec="mpeg4",
                 frames=300)


def test_uniform_clips_span_the_video() -> None:
    # 8 frames at 4 fps = 2 s per clip: starts from 0 to 8 s.
    assert clip_starts(INFO, 8, 4.0, num_clips=5) == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert clip_starts(INFO, 8, 4.0, num_clips=1) == [4.0]
    # A clip longer than the video starts at 0.
    assert clip_starts(INFO, 80, 4.0, num_clips=3) == [0.0, 0.0, 0.0]


def test_dense_windows() -> None:
    assert clip_starts(INFO, 8, 4.0, clip_stride_s=3.0) == [0.0, 3.0, 6.0]
    assert clip_starts(INFO, 8, 4.0, clip_stride_s=2.0) == [0.0, 2.0, 4.0, 6.0, 8.0]


@pytest.mark.parametrize("kwargs", [
    {"clip_len": 0, "frame_rate": 4.0, "num_clips": 2},
    {"clip_len": 8, "frame_rate": 0.0, "num_clips": 2},
    {"clip_len": 8, "frame_rate": float("nan"), "num_clips": 2},
    {"clip_len": 8, "frame_rate": 4.0},
    {"clip_len": 8, "frame_rate": 4.0, "num_clips": 2, "clip_stride_s": 1.0},
    {"clip_len": 8, "frame_rate": 4.0, "num_clips": 0},
    {"clip_len": 8, "frame_rate": 4.0, "clip_stride_s": -1.0},
    {"clip_len": 8, "frame_rate": 4.0, "clip_stride_s": 0.001},
])
def test_bad_clip_parameters_are_400(kwargs: dict[str, float]) -> None:
    with pytest.raises(InputError) as exc:
        clip_starts(INFO, **kwargs)  # type: ignore[arg-type]
    assert exc.value.status == 400


def test_frame_stride_means_fps_over_stride() -> None:
    assert sampling_rate(INFO, frame_stride=3) == 10.0
    assert sampling_rate(INFO, frame_rate=5.0) == 5.0
    with pytest.raises(InputError):
        sampling_rate(INFO, frame_rate=5.0, frame_stride=2)
    with pytest.raises(InputError):
        sampling_rate(INFO, frame_stride=0)

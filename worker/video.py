"""Video decode for /classify-video: probe an upload, plan clips, read them by timestamp.

Frames are chosen by presentation time, never by index, so variable frame rate files
sample correctly; clips far apart are reached by seeking to the keyframe before them, so
ten clips of a ten-minute video decode a small part of it. At most one clip's frames
are held at a time.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator

import av
import numpy as np

from cvserve.app.errors import InputError, PayloadTooLarge, UnsupportedMedia

# Seek rather than decode forward when the next clip starts this far past the position.
SEEK_AHEAD_S = 2.0
# A clip starting this far past the last frame that decodes means the file is cut short.
END_SLACK_S = 1.0
# Dense windows: more clips than this is a parameter error, not a workload.
MAX_CLIPS = 1000
# Video decode errors all derive from FFmpegError; a few surface as plain OSError/ValueError.
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


@dataclasses.dataclass(frozen=True)
class VideoLimits:
    """Per-request video limits; each error message names the field to raise."""

    max_bytes: int = 200 * 1024 * 1024
    max_duration_s: float = 1800.0
    max_pixels: int = 3840 * 2160  # width * height of the stored frame
    max_frames_decoded: int = 20_000  # per request, over all clips


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a probe learns about the first video stream."""

    duration_s: float
    fps: float  # average frame rate
    width: int  # upright, after rotation
    height: int  # upright, after rotation
    rotation: int  # degrees counter-clockwise a viewer rotates the stored frame: 0/90/180/270
    codec: str
    frames: int | None  # frame count the container declares, if it does


@dataclasses.dataclass
class DecodeStats:
    """Counters a caller passes to `read_clips` to learn what decoding cost."""

    frames_decoded: int = 0
    seeks: int = 0
    truncated: bool = False  # decoding stopped on an error before the end of the stream


def upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate a stored frame # [H, W, 3] by `rotation` degrees counter-clockwise (a multiple
    of 90, as `VideoFrame.rotation` reports it) to what a viewer shows # [H', W', 3]."""
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=k)) if k else rgb


def _normal_rotation(degrees: float) -> int:
    return (round(degrees / 90) % 4) * 90


def _open(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except _DECODE_ERRORS as exc:
        raise UnsupportedMedia(f"not a video container we can read ({len(data)} bytes): "
                               f"{exc}") from exc


def probe_video(data: bytes, limits: VideoLimits) -> VideoInfo:
    """Check an upload is a decodable video within `limits`; decodes only its first frame.

    415 for not-a-video, audio-only, still images and corrupt or truncated files; 413 over
    max_bytes, max_duration_s or max_pixels.
    """
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"video upload is {len(data)} bytes, over the limit of "
                              f"{limits.max_bytes} (max_bytes)")
    with _open(data) as container:
        fmt = container.format.name
        if not container.streams.video:
            found = ", ".join(
                f"{s.type} ({s.codec_context.name if s.codec_context else 'unknown codec'})"
                for s in container.streams) or "no streams"
            if container.streams.audio:
                raise UnsupportedMedia(f"an audio-only file ({fmt}: {found}); expected a "
                                       "video stream")
            raise UnsupportedMedia(f"no video stream in this {fmt} file ({found}): not a "
                                   "video, or a truncated or corrupt one")
        # FFmpeg opens a still image as a one-frame video with its image2 / *_pipe demuxers.
        if fmt == "image2" or fmt.endswith("_pipe"):
            raise UnsupportedMedia(f"a still image ({fmt}), not a video; send it to an "
                                   "image endpoint")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_pixels:
            raise PayloadTooLarge(f"video frames are {width}x{height} = {width * height} "
                                  f"pixels, over the limit of {limits.max_pixels} (max_pixels)")
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        else:
            raise UnsupportedMedia(f"the {codec} video in {fmt} declares no duration")
        if duration_s > limits.max_duration_s:
            raise PayloadTooLarge(f"video lasts {duration_s:.1f} s, over the limit of "
                                  f"{limits.max_duration_s:g} s (max_duration_s)")
        try:
            first = next(container.decode(stream), None)
        except _DECODE_ERRORS as exc:
            raise UnsupportedMedia(f"could not decode the {codec} video in {fmt}: "
                                   f"{exc}") from exc
        if first is None:
            raise UnsupportedMedia(f"the {codec} video in {fmt} has no decodable frame "
                                   "(truncated or corrupt)")
        rotation = _normal_rotation(first.rotation)
        frames = stream.frames or None
        # guessed_rate (the smallest frame interval) is a last resort: wrong for VFR.
        if stream.average_rate:
            fps = float(stream.average_rate)
        elif frames and duration_s > 0:
            fps = frames / duration_s
        else:
            fps = float(stream.guessed_rate or 0.0)
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(duration_s=duration_s, fps=fps, width=width, height=height,
                     rotation=rotation, codec=codec, frames=frames)


def sampling_rate(info: VideoInfo, frame_rate: float | None = None,
                  frame_stride: int | None = None) -> float:
    """Frames per second to sample: `frame_rate` as given, or the file's fps / `frame_stride`."""
    if (frame_rate is None) == (frame_stride is None):
        raise InputError("give exactly one of frame_rate or frame_stride")
    if frame_stride is not None:
        if frame_stride < 1:
            raise InputError(f"frame_stride must be a positive integer, got {frame_stride}")
        if info.fps <= 0:
            raise InputError("the video declares no frame rate; give frame_rate instead of "
                             "frame_stride")
        return info.fps / frame_stride
    assert frame_rate is not None
    if not (math.isfinite(frame_rate) and frame_rate > 0):
        raise InputError(f"frame_rate must be a positive number of frames per second, "
                         f"got {frame_rate}")
    return float(frame_rate)


def clip_starts(info: VideoInfo, clip_len: int, frame_rate: float,
                num_clips: int | None = None, clip_stride_s: float | None = None) -> list[float]:
    """Start times (s, from the start of the video) of clips spanning clip_len / frame_rate s.

    `num_clips` spreads clips uniformly, the first at 0 and the last ending at the end
    (one clip is centred); `clip_stride_s` places a window every clip_stride_s seconds.
    Starts are clamped so a clip fits when the video is long enough; a video shorter than
    one clip gets a single clip at 0.
    """
    if isinstance(clip_len, bool) or not isinstance(clip_len, int) or clip_len < 1:
        raise InputError(f"clip_len must be a positive integer number of frames, got {clip_len}")
    if not (math.isfinite(frame_rate) and frame_rate > 0):
        raise InputError(f"frame_rate must be a positive number of frames per second, "
                         f"got {frame_rate}")
    if (num_clips is None) == (clip_stride_s is None):
        raise InputError("give exactly one of num_clips (uniform) or clip_stride_s "
                         "(sliding windows)")
    last_start = max(0.0, info.duration_s - clip_len / frame_rate)
    if num_clips is not None:
        if isinstance(num_clips, bool) or not isinstance(num_clips, int) \
                or not 1 <= num_clips <= MAX_CLIPS:
            raise InputError(f"num_clips must be an integer from 1 to {MAX_CLIPS}, "
                             f"got {num_clips}")
        if num_clips == 1:
            return [last_start / 2]
        return [last_start * i / (num_clips - 1) for i in range(num_clips)]
    assert clip_stride_s is not None
    if not (math.isfinite(clip_stride_s) and clip_stride_s > 0):
        raise InputError(f"clip_stride_s must be a positive number of seconds, "
                         f"got {clip_stride_s}")
    count = math.floor(last_start / clip_stride_s + 1e-9) + 1
    if count > MAX_CLIPS:
        raise InputError(f"clip_stride_s={clip_stride_s:g} gives {count} clips over "
                         f"{info.duration_s:.1f} s, over {MAX_CLIPS}; use a larger stride")
    return [i * clip_stride_s for i in range(count)]


def read_clips(data: bytes, starts: list[float], clip_len: int, frame_rate: float,
               limits: VideoLimits, stats: DecodeStats | None = None) -> Iterator[np.ndarray]:
    """Yield one clip per start # [clip_len, H, W, 3] uint8 RGB, upright (H, W as VideoInfo).

    Frame i of a clip is the frame shown at t = start + i / frame_rate: the last decoded
    frame with pts_time <= t (the first frame, for t before it). A clip running past the
    last frame repeats the last frame. The reader seeks to the keyframe before a clip that
    starts more than SEEK_AHEAD_S past the position, or before it. A truncated or corrupt
    stream ends where decoding stops (`stats.truncated` when on an error): clips within
    what decoded still yield; a clip starting more than END_SLACK_S past the last frame
    that decodes raises 415. Over max_frames_decoded raises 413.
    Call `probe_video` first; `stats` (if given) counts frames decoded and seeks.
    """
    stats = stats if stats is not None else DecodeStats()
    with _open(data) as container:
        if not container.streams.video:
            raise UnsupportedMedia("no video stream to read clips from")
        stream = container.streams.video[0]
        time_base = stream.time_base
        origin = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
        reader = _FrameCursor(container, stream, limits, stats)
        for start in starts:
            times = [origin + start + i / frame_rate for i in range(clip_len)]
            if reader.needs_seek(times[0]):
                reader.seek(times[0])
            clip: np.ndarray | None = None
            for i, t in enumerate(times):
                rgb = reader.frame_at(t)
                if i == 0 and reader.ended_before(t - END_SLACK_S):
                    raise UnsupportedMedia(f"the video stops decoding before the clip at "
                                           f"{start:.2f} s (truncated or corrupt)")
                if clip is None:
                    clip = np.empty((clip_len, *rgb.shape), dtype=np.uint8)
                clip[i] = rgb
            assert clip is not None
            yield clip
        reader.close()


class _FrameCursor:
    """Forward-only view of the decoded frames: the current (shown) frame and one ahead."""

    def __init__(self, container: av.container.InputContainer, stream: av.VideoStream,
                 limits: VideoLimits, stats: DecodeStats) -> None:
        self._container, self._stream = container, stream
        self._limits, self._stats = limits, stats
        self._frames: Iterator[av.VideoFrame] | None = None
        self._current: tuple[float, av.VideoFrame] | None = None
        self._current_rgb: np.ndarray | None = None
        self._ahead: tuple[float, av.VideoFrame] | None = None
        self._ended = False
        self._size: tuple[int, int] | None = None  # stored (width, height) of the first frame
        self._last_time = 0.0

    def needs_seek(self, t: float) -> bool:
        if self._frames is None:
            return t > SEEK_AHEAD_S
        position = self._current[0] if self._current is not None else None
        if position is not None and t < position:
            return True  # behind us: the cursor only moves forward
        return t > (position if position is not None else 0.0) + SEEK_AHEAD_S

    def ended_before(self, t: float) -> bool:
        """Whether decoding reached the end and its last frame is before time t."""
        return self._ended and self._current is not None and self._current[0] < t

    def seek(self, t: float) -> None:
        self.close()
        self._container.seek(max(0, int(t / self._stream.time_base)), stream=self._stream,
                             backward=True)
        self._stats.seeks += 1
        self._frames = None
        self._current = self._ahead = None
        self._current_rgb = None
        self._ended = False

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()  # type: ignore[attr-defined]

    def _next(self) -> tuple[float, av.VideoFrame] | None:
        if self._ended:
            return None
        if self._frames is None:
            self._frames = self._container.decode(self._stream)
        try:
            frame = next(self._frames, None)
        except _DECODE_ERRORS:
            frame = None
            self._stats.truncated = True
        if frame is None:
            self._ended = True
            return None
        self._stats.frames_decoded += 1
        if self._stats.frames_decoded > self._limits.max_frames_decoded:
            raise PayloadTooLarge(f"decoding the clips needs more than "
                                  f"{self._limits.max_frames_decoded} frames "
                                  "(max_frames_decoded); ask for fewer or shorter clips")
        # A frame without a pts (rare, some AVI) is taken to follow the one before it.
        t = float(frame.time) if frame.time is not None else self._last_time
        self._last_time = t
        return t, frame

    def frame_at(self, t: float) -> np.ndarray:
        """The upright RGB frame shown at time t # [H, W, 3] uint8."""
        eps = 1e-6
        while True:
            if self._ahead is None:
                self._ahead = self._next()
                if self._ahead is None:
                    break
            if self._ahead[0] <= t + eps or self._current is None and self._ahead[0] > t:
                self._current, self._ahead = self._ahead, None
                self._current_rgb = None
                if self._current[0] > t:
                    break  # t lies before the first frame: show the first frame
                continue
            break
        if self._current is None:
            raise UnsupportedMedia(f"no video frame decodes at or before {t:.2f} s "
                                   "(truncated or corrupt)")
        if self._current_rgb is None:
            self._current_rgb = self._to_rgb(self._current[1])
        return self._current_rgb

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        if self._size is None:
            self._size = (frame.width, frame.height)
        width, height = self._size  # a mid-stream size change is scaled back to the first
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
        return upright(rgb, _normal_rotation(frame.rotation))

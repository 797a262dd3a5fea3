"""Video decode for /classify-video: probe an upload, plan clips, read them by timestamp.

Frames are chosen by presentation time, never by index, so variable frame rate files
sample correctly; clips far apart are reached by seeking to the keyframe before them, so
ten clips of a ten-minute video decode a small part of it. At most one clip's frames
are held at a time.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterator

import av
import numpy as np

from cvserve.app.errors import InputError, PayloadTooLarge, UnsupportedMedia
from cvserve.app.media import (
    DECODE_ERRORS,
    VideoInfo,
    VideoLimits,
    normal_rotation,
    open_video,
    probe_video,
)

__all__ = ["DecodeStats", "VideoInfo", "VideoLimits", "clip_starts", "probe_video",
           "read_clips", "sampling_rate", "upright"]

# Without a keyframe index (a container whose packets carry no keyframe flag), seek
# rather than decode forward when the next clip starts this far past the position.
SEEK_AHEAD_S = 2.0
# With one, seek when a keyframe lies between the position and the next clip, at least
# this far ahead (a seek that skips less than this saves less than it costs).
MIN_SKIP_S = 0.25
# A clip starting this far past the last frame that decodes means the file is cut short.
END_SLACK_S = 1.0
# Dense windows: more clips than this is a parameter error, not a workload.
MAX_CLIPS = 1000


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
    (one clip is centred); `clip_stride_s` places a window every clip_stride_s seconds,
    each start rounded to the nearest sampled frame (1 / frame_rate).
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
    # On the sampling grid (a whole number of sampled frames apart), overlapping windows
    # sample the same frames, and read_clips decodes them once.
    return [round(i * clip_stride_s * frame_rate) / frame_rate for i in range(count)]


def read_clips(data: bytes, starts: list[float], clip_len: int, frame_rate: float,
               limits: VideoLimits, stats: DecodeStats | None = None) -> Iterator[np.ndarray]:
    """Yield one clip per start # [clip_len, H, W, 3] uint8 RGB, upright (H, W as VideoInfo).

    Frame i of a clip is the frame shown at t = start + i / frame_rate: the last decoded
    frame with pts_time <= t (the first frame, for t before it). A clip running past the
    last frame repeats the last frame. Starts are taken in order; frames a clip shares
    with the one before (overlapping windows on the same sampling grid) are reused, not
    decoded again; the reader seeks only where a keyframe lies between its position and
    the next clip (or back, to a clip before what it still holds). A truncated or corrupt
    stream ends where decoding stops (`stats.truncated` when on an error): clips within
    what decoded still yield; a clip starting more than END_SLACK_S past the last frame
    that decodes raises 415. Over max_frames_decoded raises 413.
    Call `probe_video` first; `stats` (if given) counts frames decoded and seeks.
    """
    stats = stats if stats is not None else DecodeStats()
    keyframes = keyframe_times(data)
    with open_video(data) as container:
        if not container.streams.video:
            raise UnsupportedMedia("no video stream to read clips from")
        stream = container.streams.video[0]
        time_base = stream.time_base
        origin = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
        reader = _FrameCursor(container, stream, limits, stats, keyframes)
        for k, start in enumerate(starts):
            times = [origin + start + i / frame_rate for i in range(clip_len)]
            if reader.needs_seek(times):
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
            if k + 1 < len(starts):
                reader.forget_before(origin + starts[k + 1])
            yield clip
        reader.close()


def keyframe_times(data: bytes) -> list[float]:
    """Presentation times (s) of the video stream's keyframes, ascending, from a demux pass
    over the packets (no decoding); empty when the container flags none."""
    times = []
    try:
        with open_video(data) as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.is_keyframe and packet.pts is not None:
                    times.append(float(packet.pts * stream.time_base))
    except (*DECODE_ERRORS, IndexError):
        pass  # a damaged tail: the keyframes before it still help
    return sorted(times)


class _FrameCursor:
    """A forward view of the decoded frames (the shown one and one ahead), plus the RGB
    frames the current clip sampled, which an overlapping next clip reuses."""

    def __init__(self, container: av.container.InputContainer, stream: av.VideoStream,
                 limits: VideoLimits, stats: DecodeStats, keyframes: list[float]) -> None:
        self._container, self._stream = container, stream
        self._limits, self._stats = limits, stats
        self._keyframes = keyframes
        self._frames: Iterator[av.VideoFrame] | None = None
        self._current: tuple[float, av.VideoFrame] | None = None
        self._current_rgb: np.ndarray | None = None
        self._ahead: tuple[float, av.VideoFrame] | None = None
        self._ended = False
        self._size: tuple[int, int] | None = None  # stored (width, height) of the first frame
        self._last_time = 0.0
        self._shown: list[float] = []  # pts of the frames decoded since the last seek/forget
        self._sampled: dict[float, np.ndarray] = {}  # pts -> RGB of frames clips used

    def _position(self) -> float | None:
        return self._current[0] if self._current is not None else None

    def needs_seek(self, times: list[float]) -> bool:
        """Whether to seek before reading a clip sampled at `times`."""
        position = self._position()
        if position is not None and times[0] < position:
            # Behind us: fine if every frame needed there is one a clip already sampled.
            return any(self._replay(t) is None for t in times if t < position)
        t = times[0]
        if not self._keyframes:
            return t > (position or 0.0) + SEEK_AHEAD_S
        # Nothing decoded yet: decoding would start at the first keyframe.
        here = position if position is not None else self._keyframes[0]
        i = bisect.bisect_right(self._keyframes, t) - 1  # the keyframe a seek lands on
        return i >= 0 and self._keyframes[i] > here + MIN_SKIP_S

    def _replay(self, t: float) -> np.ndarray | None:
        """The frame shown at t, if it is one this cursor sampled and still holds."""
        i = bisect.bisect_right(self._shown, t + 1e-6) - 1
        return self._sampled.get(self._shown[i]) if i >= 0 else None

    def forget_before(self, t: float) -> None:
        """Let go of sampled frames no clip starting at t or later can show."""
        i = bisect.bisect_right(self._shown, t + 1e-6) - 1
        if i > 0:
            keep_from = self._shown[i]
            del self._shown[:i]
            self._sampled = {pts: rgb for pts, rgb in self._sampled.items() if pts >= keep_from}

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
        self._shown.clear()
        self._sampled.clear()

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
        except DECODE_ERRORS:
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
        self._shown.append(t)
        return t, frame

    def frame_at(self, t: float) -> np.ndarray:
        """The upright RGB frame shown at time t # [H, W, 3] uint8."""
        eps = 1e-6
        position = self._position()
        if position is not None and t < position - eps:
            replay = self._replay(t)
            if replay is None:  # needs_seek said the clip replays; a caller broke that
                raise RuntimeError(f"frame at {t:.3f} s is behind the cursor and not held")
            return replay
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
            self._sampled[self._current[0]] = self._current_rgb
        return self._current_rgb

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        if self._size is None:
            self._size = (frame.width, frame.height)
        width, height = self._size  # a mid-stream size change is scaled back to the first
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
        return upright(rgb, normal_rotation(frame.rotation))

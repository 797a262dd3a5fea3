"""Cheap input checks shared by api and worker: what an upload is, and how large it decodes.

Images: only headers are read (Pillow opens lazily), so a decompression bomb is refused
before a single pixel is allocated. Videos: the container is opened with PyAV and one
frame decoded (no torch here: the api runs this before queueing).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from dataclasses import dataclass

import av
from PIL import Image, UnidentifiedImageError

from .errors import InputError, PayloadTooLarge, UnsupportedMedia
from .settings import Settings

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
# Video decode errors all derive from FFmpegError; a few surface as plain OSError/ValueError.
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def probe_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Format and size from the header. Raises 400 / 413 / 415 errors."""
    if not data:
        raise InputError("the upload is empty; send an image as multipart `file` or as the "
                         "request body")
    try:
        with warnings.catch_warnings():
            # Pillow warns (or errors) on huge images; we apply our own limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = im.format or "", im.size
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image too large: {exc}; limit is CVSERVE_IMAGE_PIXELS="
                              f"{max_pixels}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UnsupportedMedia(
            f"not an image we can decode ({len(data)} bytes, starting {data[:8]!r}); "
            f"expected one of {', '.join(sorted(IMAGE_FORMATS))}"
        ) from exc
    if fmt not in IMAGE_FORMATS:
        raise UnsupportedMedia(f"image format {fmt or 'unknown'} is not supported; expected "
                               f"one of {', '.join(sorted(IMAGE_FORMATS))}")
    if width < 1 or height < 1:
        raise UnsupportedMedia(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit "
                              f"is {max_pixels} (CVSERVE_IMAGE_PIXELS)")
    return ImageInfo(fmt, width, height)


@dataclasses.dataclass(frozen=True)
class VideoLimits:
    """Per-request video limits; each error message names the field to raise."""

    max_bytes: int = 200 * 1024 * 1024
    max_duration_s: float = 1800.0
    max_pixels: int = 3840 * 2160  # width * height of the stored frame
    max_frames_decoded: int = 20_000  # per request, over all clips

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoLimits:
        return cls(max_bytes=settings.video_upload_bytes,
                   max_duration_s=settings.video_max_duration_s,
                   max_pixels=settings.video_max_pixels,
                   max_frames_decoded=settings.video_max_frames_decoded)


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


def normal_rotation(degrees: float) -> int:
    return (round(degrees / 90) % 4) * 90


def open_video(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except DECODE_ERRORS as exc:
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
    with open_video(data) as container:
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
        except DECODE_ERRORS as exc:
            raise UnsupportedMedia(f"could not decode the {codec} video in {fmt}: "
                                   f"{exc}") from exc
        if first is None:
            raise UnsupportedMedia(f"the {codec} video in {fmt} has no decodable frame "
                                   "(truncated or corrupt)")
        rotation = normal_rotation(first.rotation)
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

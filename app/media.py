"""Cheap input checks shared by api and worker: what an upload is, and how large it decodes.

Only headers are read here (Pillow opens lazily), so a decompression bomb is refused
before a single pixel is allocated.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .errors import InputError, PayloadTooLarge, UnsupportedMedia

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}


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

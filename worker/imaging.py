"""Image decode and encode for every image task (decode happens once, in the worker)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

from cvserve.app.errors import UnsupportedMedia
from cvserve.app.media import ImageInfo, probe_image

# libjpeg-turbo / libpng / libwebp through torchvision: no PIL round trip for the common
# formats. Everything else Pillow decodes.
_TORCHVISION_FORMATS = {"JPEG", "PNG", "WEBP", "MPO"}


def decode_rgb(data: bytes, max_pixels: int) -> tuple[torch.Tensor, ImageInfo]:
    """Decode an upload to an upright RGB image. # [3, H, W] uint8 (EXIF rotation applied)"""
    info = probe_image(data, max_pixels)
    try:
        if info.format in _TORCHVISION_FORMATS:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = decode_image(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        else:
            with Image.open(io.BytesIO(data)) as im:
                im = ImageOps.exif_transpose(im.convert("RGB"))
                img = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except (RuntimeError, OSError, ValueError, SyntaxError) as exc:
        raise UnsupportedMedia(f"could not decode the {info.format} image "
                               f"({info.width}x{info.height}): {exc}") from exc
    if img.ndim == 4:  # an animated image: its first frame
        img = img[0]
    return img.contiguous(), info


def encode_png(img: torch.Tensor) -> bytes:
    """# img: [3, H, W] uint8 -> PNG bytes"""
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

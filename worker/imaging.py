"""Image decode and encode for every image task (decode happens once, in the worker)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import torch
from PIL import Image, ImageOps

from cvserve.app.errors import UnsupportedMedia
from cvserve.app.media import ImageInfo, probe_image


def decode_rgb(data: bytes, max_pixels: int) -> tuple[torch.Tensor, ImageInfo]:
    """Decode an upload to the upright RGB image a viewer shows. # [3, H, W] uint8
    (channels-last strides), and its format and upright size.

    Pillow, not torchvision.io: torchvision 0.29 deprecates its decoders, and Pillow also
    covers CMYK, palette and EXIF-rotated images. An animated image gives its first frame.
    """
    info = probe_image(data, max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as im:
            # In place and converted only when needed: each copy of a photo costs ~0.5 ms.
            ImageOps.exif_transpose(im, in_place=True)
            rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # [H, W, 3]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnsupportedMedia(f"could not decode the {info.format} image "
                               f"({info.width}x{info.height}): {exc}") from exc
    # The size the user sees: an EXIF rotation by 90 degrees swaps the stored one.
    info = dataclasses.replace(info, width=rgb.shape[1], height=rgb.shape[0])
    # Channels-last in memory, as decoded: OpenCV's resize reads it without a copy, and
    # torch's ops take either layout.
    return torch.from_numpy(rgb).permute(2, 0, 1), info


def encode_png(img: torch.Tensor) -> bytes:
    """# img: [3, H, W] uint8 -> PNG bytes"""
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

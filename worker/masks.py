"""Masks into answers: COCO RLE and polygons, Mask R-CNN pasting, label-map PNGs, renderings.

Instance masks are pasted and encoded one detection at a time (`paste_masks` is lazy), so
that many instances on a large image never hold N full-size masks at once.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from itertools import islice

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_mask_in_image
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

# The COCO person skeleton (person_keypoints_*.json "skeleton"), 0-based keypoint indices:
# legs, hips, torso, arms, then face and ears-to-shoulders.
COCO_SKELETON: list[tuple[int, int]] = [
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
]

MASK_CHUNK = 8  # instance masks blended per draw_segmentation_masks call
MASK_ALPHA = 0.5  # exact in float32: draw_segmentation_masks truncates, and x*0.5 + x*0.5 == x
LEGEND_ROWS = 10  # classes listed in the legend of render_semantic; the rest as "+k more"


def encode_rle(mask: np.ndarray) -> dict:
    """# mask [H, W] bool (or 0/nonzero) -> COCO compressed RLE {"size": [H, W], "counts": str}"""
    if mask.ndim != 2:
        raise ValueError(f"expected a [H, W] mask, got shape {mask.shape}")
    # pycocotools reads column-major uint8 0/1; other nonzero values would break its runs.
    rle = mask_utils.encode(np.asfortranarray(mask.astype(bool, copy=False), dtype=np.uint8))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours as COCO polygons [[x1, y1, x2, y2, ...], ...] in pixels. # mask [H, W]"""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8),
                                   cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # OpenCV gives boundary pixels by index; COCO's pixel x spans [x, x + 1), so + 0.5 puts
    # the polygon through their centres (as detectron2 does). Fewer than 3 points (a dot, a
    # line) make no polygon.
    return [(c.reshape(-1, 2) + 0.5).ravel().tolist() for c in contours if len(c) >= 3]


def paste_masks(masks: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor,
                image_hw: tuple[int, int], threshold: float = 0.5) -> Iterator[np.ndarray]:
    """Mask R-CNN masks pasted into the image, one detection at a time, as torchvision's
    paste_masks_in_image pastes them. # masks [N, M, M] float probabilities, boxes [N, 4]
    xyxy image pixels -> N x [H, W] bool"""
    masks, boxes = torch.as_tensor(masks), torch.as_tensor(boxes)
    if masks.ndim != 3 or boxes.shape != (len(masks), 4):
        raise ValueError(f"expected masks [N, M, M] and boxes [N, 4], got masks "
                         f"{tuple(masks.shape)} and boxes {tuple(boxes.shape)}")
    if not masks.is_floating_point():
        masks = masks.float()
    # Shared with paste_masks_in_image (its default padding=1); only the loop is ours, lazy.
    padded, scale = expand_masks(masks[:, None], padding=1)  # [N, 1, M + 2, M + 2]
    boxes_px = expand_boxes(boxes, scale).to(torch.int64)
    height, width = image_hw
    return ((paste_mask_in_image(m[0], box, height, width) > threshold).cpu().numpy()
            for m, box in zip(padded, boxes_px, strict=True))


def palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: index 0 black, 1 (128, 0, 0), 2 (0, 128, 0) ... # [n, 3] uint8

    By hand, as no installed library exports it. Each index's bits go three at a time to the
    high bits of R, G and B; VOC uses the first 256, and the same rule keeps colours distinct
    up to 2**24 (beyond that they repeat).
    """
    index = np.arange(n)[:, None]  # [n, 1]
    colours = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):
        colours |= ((index >> (3 * bit + np.arange(3))) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def _check_label_map(label_map: np.ndarray, num_classes: int | None = None) -> None:
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"expected a [H, W] integer label map, got shape {label_map.shape} "
                         f"and dtype {label_map.dtype}")
    if label_map.size == 0:
        return
    low, high = int(label_map.min()), int(label_map.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        expected = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"class indices must be {expected}, got [{low}, {high}]")


def label_map_png(label_map: np.ndarray, num_classes: int) -> bytes:
    """PNG whose pixel values are the class indices: 8-bit with the VOC palette up to 256
    classes, else 16-bit grayscale. # label_map [H, W] int in [0, num_classes)"""
    _check_label_map(label_map, num_classes)
    if num_classes <= 256:
        image = Image.fromarray(label_map.astype(np.uint8))
        image.putpalette(palette(num_classes).tobytes())  # "L" becomes "P", values kept
    elif num_classes <= 2**16:
        image = Image.fromarray(label_map.astype(np.uint16))  # mode "I;16"
    else:
        raise ValueError(f"a PNG label map holds at most 65536 classes, got {num_classes}")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def class_rles(label_map: np.ndarray) -> dict[int, dict]:
    """COCO RLE of each class present, ascending. # label_map [H, W] int -> {class: RLE}"""
    _check_label_map(label_map)
    return {int(c): encode_rle(label_map == c) for c in np.unique(label_map)}


def _legend_font(image_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(10, round(image_size / 60)))
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font, no size argument
        return ImageFont.load_default()


def _draw_legend(image: Image.Image, rows: list[tuple[tuple[int, ...] | None, str]]) -> None:
    """Swatch and text per row, in a semi-opaque dark box at the top left (in place)."""
    draw = ImageDraw.Draw(image, "RGBA")  # RGBA fills blend onto the RGB image
    font = _legend_font(max(image.size))
    line = draw.textbbox((0, 0), "Ag%", font=font)[3]
    pad = max(2, line // 4)
    text_x = 2 * pad + line
    width = text_x + max(draw.textlength(text, font=font) for _, text in rows) + pad
    draw.rectangle((0, 0, width, pad + len(rows) * (line + pad)), fill=(0, 0, 0, 160))
    for i, (colour, text) in enumerate(rows):
        top = pad + i * (line + pad)
        if colour is not None:
            draw.rectangle((pad, top, pad + line - 1, top + line - 1), fill=colour)
        draw.text((text_x, top), text, fill=(255, 255, 255), font=font)


def render_semantic(image: torch.Tensor, label_map: np.ndarray, labels: list[str],
                    alpha: float = 0.5) -> torch.Tensor:
    """Each class but background (0) blended in its palette colour, plus a legend of the
    classes by area. # image [3, H, W] uint8 RGB, label_map [H, W] int -> [3, H, W] uint8

    Classes without a name in `labels` are listed by index; the background is not listed.
    """
    if label_map.shape != tuple(image.shape[1:]):
        raise ValueError(f"expected a label map of the image's size {tuple(image.shape[1:])}, "
                         f"got {label_map.shape}")
    _check_label_map(label_map)
    counts = np.bincount(label_map.ravel(), minlength=len(labels))
    colours = palette(len(counts))
    # One palette lookup, by hand: draw_segmentation_masks would need a full-size bool mask
    # per class at once.
    overlay = torch.from_numpy(colours[label_map]).permute(2, 0, 1)  # [3, H, W]
    blended = (image * (1 - alpha) + overlay * alpha).round().to(torch.uint8)
    out = torch.where(torch.from_numpy(label_map > 0), blended, image)

    present = [int(c) for c in np.argsort(-counts, kind="stable") if c > 0 and counts[c]]
    rows: list[tuple[tuple[int, ...] | None, str]] = [
        (tuple(colours[c].tolist()),
         f"{labels[c] if c < len(labels) else c} {100 * counts[c] / label_map.size:.1f}%")
        for c in present[:LEGEND_ROWS]]
    if len(present) > LEGEND_ROWS:
        rows.append((None, f"+{len(present) - LEGEND_ROWS} more"))
    if not rows:
        return out
    pil = to_pil_image(out)
    _draw_legend(pil, rows)
    return pil_to_tensor(pil)


def _draw_masks(image: torch.Tensor, masks: Iterable[np.ndarray],
                colours: list[tuple[int, ...]]) -> torch.Tensor:
    """Blend N masks, MASK_CHUNK at a time. # image [3, H, W] uint8, masks N x [H, W] bool"""
    drawn, pending = 0, iter(masks)
    while chunk := list(islice(pending, MASK_CHUNK)):
        if drawn + len(chunk) > len(colours):
            raise ValueError(f"expected {len(colours)} masks, one per box, got more")
        stacked = torch.from_numpy(np.stack(chunk).astype(bool, copy=False))  # [n, H, W]
        # draw_segmentation_masks blackens pixels where masks of one call overlap; let the
        # later instance win there instead, as it does across calls.
        covered = torch.zeros_like(stacked[0])
        for i in reversed(range(len(stacked))):
            stacked[i] &= ~covered
            covered |= stacked[i]
        image = draw_segmentation_masks(image, stacked, alpha=MASK_ALPHA,
                                        colors=colours[drawn:drawn + len(chunk)])
        drawn += len(chunk)
    if drawn != len(colours):
        raise ValueError(f"expected {len(colours)} masks, one per box, got {drawn}")
    return image


def render_instances(image: torch.Tensor, boxes: torch.Tensor, captions: list[str],
                     masks: Iterable[np.ndarray] | None = None,
                     keypoints: torch.Tensor | None = None,
                     skeleton: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Masks, keypoints, then boxes with captions, a palette colour per instance.
    # image [3, H, W] uint8, boxes [N, 4] xyxy image pixels, masks N x [H, W] bool,
    keypoints [N, K, 3] (x, y, score; drawn where score > 0) -> [3, H, W] uint8"""
    if len(boxes) == 0:
        return image
    colours = [tuple(c) for c in palette(len(boxes) + 1)[1:].tolist()]  # no black
    line = max(2, round(max(image.shape[1:]) / 300))
    if masks is not None:
        image = _draw_masks(image, masks, colours)
    if keypoints is not None:
        # One call per instance: draw_keypoints takes a single colour.
        for points, colour in zip(keypoints.cpu(), colours, strict=True):
            image = draw_keypoints(image, points[None, :, :2], connectivity=skeleton,
                                   colors=colour, radius=line, width=line,
                                   visibility=points[None, :, 2] > 0)
    return draw_bounding_boxes(image, boxes.cpu(), labels=captions, colors=colours, width=line)

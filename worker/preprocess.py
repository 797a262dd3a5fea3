"""Image preprocessing as model.toml declares it, and the geometry that undoes it.

A real model arrives in its exporter's conventions (../shared/models/README.md): a fixed
input size reached by stretching, letterboxing or centre-cropping; RGB or BGR; 0-255 or
normalized; NCHW or NHWC. `preprocess` applies the declared convention and returns a
`Geometry` that maps the model's coordinates back to the upright image the user sent.

    decode (imaging.py) -> resize -> colour order -> x * scale -> (x - mean) / std
                        -> layout -> dtype
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cvserve.app.errors import InputError, PayloadTooLarge

from .repository import InputSpec


@dataclass(frozen=True)
class Geometry:
    """model pixel = original pixel * scale + offset, per axis (x, y)."""

    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    scale_xy: tuple[float, float]
    offset_xy: tuple[float, float]

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """# [N, 4] xyxy model pixels -> [N, 4] xyxy original pixels.

        Not clipped to the image: the reference pipelines (YOLOX's demo among them) report
        a box as the model predicts it, and the listed expected values follow them.
        """
        (sx, sy), (ox, oy) = self.scale_xy, self.offset_xy
        out = np.asarray(boxes, dtype=np.float32).copy()
        out[:, 0::2] = (out[:, 0::2] - ox) / sx
        out[:, 1::2] = (out[:, 1::2] - oy) / sy
        return out

    def map_to_original(self, values: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
        """# [..., H_in, W_in] model-input map -> [..., h, w] on the original image.

        The inverse warp, sampled at each original pixel's centre: letterbox padding
        falls away, a centre crop leaves the uncovered border at the nearest edge value.
        """
        h, w = self.original_hw
        (sx, sy), (ox, oy) = self.scale_xy, self.offset_xy
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) * sy + oy  # model px, centres
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) * sx + ox
        in_h, in_w = values.shape[-2:]
        # grid_sample's normalized coords with align_corners=False: -1 / 1 = outer edges.
        gy = ys / in_h * 2 - 1
        gx = xs / in_w * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        lead = values.shape[:-2]
        flat = values.reshape(1, -1, in_h, in_w)
        dtype = flat.dtype
        out = F.grid_sample(flat.float(), grid, mode=mode, padding_mode="border",
                            align_corners=False)
        return out.to(dtype).reshape(*lead, h, w)


def resize_uint8(image: torch.Tensor, hw: tuple[int, int], antialias: bool,
                 uint8_kernel: bool = False) -> torch.Tensor:
    """# [3, h, w] or [N, 3, h, w] uint8 -> [(N,) 3, H, W] uint8, bilinear, half-pixel centres.

    Without antialiasing this is OpenCV's INTER_LINEAR to within one level (letterboxed
    images take OpenCV's own, letterbox_opencv); with it, Pillow's / torchvision's
    bilinear. Rounded back to uint8 as both do.
    `uint8_kernel`: torch's own uint8 kernel instead of float arithmetic — what
    torchvision's resize runs on uint8 tensors (its video presets among them), so equal to
    it where the float path is off by one level on ~20% of pixels; on channels-last frames
    (decoded video) it is ~8x faster than the float path (16 frames of 720p: 9 vs 71 ms).
    """
    if tuple(image.shape[-2:]) == tuple(hw):
        return image
    x = image if image.ndim == 4 else image[None]
    if uint8_kernel:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=antialias)
    else:
        x = F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False,
                          antialias=antialias)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x if image.ndim == 4 else x[0]


# The most pixels an image may have once resized for a model. Resizing keeps the aspect
# ratio, so a small but very elongated image (30000 x 10, well under the upload's pixel
# limit) would grow to 520 x 1,560,000 under a segmenter's "shorter side to 520": gigabytes
# of floats. Refused (413) instead, before anything is allocated.
MAX_RESIZED_PIXELS = 16_000_000


def check_resized(image_hw: tuple[int, int], resized_hw: tuple[int, int]) -> None:
    h, w = resized_hw
    if h < 1 or w < 1:
        raise InputError(f"the image ({image_hw[1]}x{image_hw[0]}) is too elongated for this "
                         f"model: it would be resized to {w}x{h}")
    if h * w > MAX_RESIZED_PIXELS:
        raise PayloadTooLarge(f"the image ({image_hw[1]}x{image_hw[0]}) would be resized to "
                              f"{w}x{h} for this model, over {MAX_RESIZED_PIXELS} pixels: its "
                              "aspect ratio is too extreme")


def check_rcnn_size(image_hw: tuple[int, int], spec: InputSpec) -> None:
    """torchvision's GeneralizedRCNNTransform: one scale, the shorter side to min_size
    unless the longer would pass max_size (or fixed_size); the sides are floored."""
    if spec.fixed_size is not None:
        return
    h, w = image_hw
    scale = min(spec.min_size / min(h, w), spec.max_size / max(h, w))
    check_resized(image_hw, (int(h * scale), int(w * scale)))


def fit(image_hw: tuple[int, int], spec: InputSpec) -> tuple[tuple[int, int], Geometry]:
    """Where the image lands in the model input: (resized size, geometry)."""
    resized, geometry = _fit(image_hw, spec)
    check_resized(image_hw, resized)
    return resized, geometry


def _fit(image_hw: tuple[int, int], spec: InputSpec) -> tuple[tuple[int, int], Geometry]:
    h, w = image_hw
    if spec.resize == "shorter":
        # torchvision's Resize(int): the shorter side to the target, the longer truncated.
        shorter = spec.resize_shorter or 1  # validated: set for this mode
        nh, nw = (shorter, max(1, int(shorter * w / h))) if h <= w else (
            max(1, int(shorter * h / w)), shorter)
        return (nh, nw), Geometry(image_hw, (nh, nw), (nw / w, nh / h), (0.0, 0.0))
    in_h, in_w = spec.size  # type: ignore[misc]  # validated: only rcnn/shorter lack size
    if spec.resize == "stretch":
        return (in_h, in_w), Geometry(image_hw, (in_h, in_w), (in_w / w, in_h / h), (0.0, 0.0))
    if spec.resize == "letterbox":
        # YOLOX / YOLOv5 convention: one ratio for both axes, the resized size truncated.
        r = min(in_h / h, in_w / w)
        nh, nw = max(1, int(h * r)), max(1, int(w * r))
        ox, oy = ((in_w - nw) // 2, (in_h - nh) // 2) if spec.anchor == "center" else (0, 0)
        return (nh, nw), Geometry(image_hw, (in_h, in_w), (r, r), (float(ox), float(oy)))
    # center-crop: torchvision's Resize(shorter) or Resize((h, w)), then CenterCrop(size)
    if spec.resize_to is not None:
        nh, nw = spec.resize_to
    elif h <= w:
        shorter = spec.resize_shorter or max(in_h, in_w)
        nh, nw = shorter, int(shorter * w / h)
    else:
        shorter = spec.resize_shorter or max(in_h, in_w)
        nh, nw = int(shorter * h / w), shorter
    top, left = int(round((nh - in_h) / 2)), int(round((nw - in_w) / 2))
    return (nh, nw), Geometry(image_hw, (in_h, in_w), (nw / w, nh / h),
                              (float(-left), float(-top)))


def preprocess(image: torch.Tensor, spec: InputSpec) -> tuple[np.ndarray, Geometry]:
    """# [3, h, w] uint8 RGB -> model input [3, H, W] (NCHW) or [H, W, 3] (NHWC), Geometry"""
    x, geo = preprocess_frames(image[None], spec)
    return x[0], geo


def preprocess_frames(frames: torch.Tensor, spec: InputSpec, uint8_kernel: bool = False
                      ) -> tuple[np.ndarray, Geometry]:
    """# [N, 3, h, w] uint8 RGB frames of one size -> [N, 3, H, W] (NCHW) or [N, H, W, 3]
    (NHWC) model input, and the Geometry they share (`uint8_kernel`: see resize_uint8)."""
    if spec.resize == "letterbox" and not (spec.antialias or uint8_kernel):
        return letterbox_opencv(frames, spec)
    resized_hw, geo = fit(tuple(frames.shape[-2:]), spec)
    resized = resize_uint8(frames, resized_hw, spec.antialias, uint8_kernel)
    n = frames.shape[0]
    in_h, in_w = geo.input_hw
    if spec.resize == "letterbox":
        canvas = torch.full((n, 3, in_h, in_w), float(spec.pad_value), dtype=torch.float32)
        ox, oy = int(geo.offset_xy[0]), int(geo.offset_xy[1])
        canvas[:, :, oy:oy + resized_hw[0], ox:ox + resized_hw[1]] = resized
        x = canvas
    elif spec.resize == "center-crop":
        top, left = int(-geo.offset_xy[1]), int(-geo.offset_xy[0])
        x = resized[:, :, top:top + in_h, left:left + in_w].float()
    else:
        x = resized.float()
    if spec.color == "BGR":
        x = x.flip(1)
    if spec.dtype != "uint8":
        mean = torch.tensor(spec.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(spec.std, dtype=torch.float32)[:, None, None]
        x = (x * spec.scale - mean) / std
    if spec.layout == "NHWC":
        x = x.permute(0, 2, 3, 1)
    return x.contiguous().numpy().astype(spec.dtype, copy=False), geo


def letterbox_opencv(frames: torch.Tensor, spec: InputSpec) -> tuple[np.ndarray, Geometry]:
    """preprocess_frames for YOLO's letterbox without antialiasing: OpenCV's
    INTER_LINEAR itself, which YOLO exporters preprocess with (resize_uint8 matches it to
    within one level only), placed and flipped in uint8, then one pass to the model's
    dtype. A tenth of the torch path's time (YOLOX-Nano, 640x426 photos, one thread: 1.1
    vs 9.6 ms), where preprocessing was 40 % of a CPU server's busy time. Stretch and
    centre crop keep the torch path: their references are torchvision's presets, whose
    float resize it equals."""
    resized_hw, geo = fit(tuple(frames.shape[-2:]), spec)
    (nh, nw), (in_h, in_w) = resized_hw, geo.input_hw
    hwc = frames.permute(0, 2, 3, 1).numpy()  # channels-last frames (decode_rgb's) as is
    resized = np.stack([cv2.resize(np.ascontiguousarray(f), (nw, nh),
                                   interpolation=cv2.INTER_LINEAR)
                        for f in hwc]) if (nh, nw) != hwc.shape[1:3] else hwc
    pad = spec.pad_value
    exact = float(pad).is_integer() and 0 <= pad <= 255
    x = np.full((len(hwc), in_h, in_w, 3), pad, np.uint8 if exact else np.float32)
    ox, oy = int(geo.offset_xy[0]), int(geo.offset_xy[1])
    x[:, oy:oy + nh, ox:ox + nw] = resized
    if spec.color == "BGR":
        x = x[..., ::-1]
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    if spec.dtype == "uint8":
        return np.ascontiguousarray(x, dtype=np.uint8), geo
    x = np.ascontiguousarray(x, dtype=np.float32)
    if spec.scale != 1.0:
        x *= np.float32(spec.scale)
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    if mean.any() or (std != 1).any():
        axis = (1, 3, 1, 1) if spec.layout == "NCHW" else (1, 1, 1, 3)
        x -= mean.reshape(axis)
        x /= std.reshape(axis)
    return x.astype(spec.dtype, copy=False), geo

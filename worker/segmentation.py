"""Semantic segmentation: one class per pixel, answered at the original resolution.

    prepare:  decode -> resize (model.toml) -> colours, scale, layout   (thread pool)
    run:      stack images of one input size -> model -> class logits   (model thread)
    finish:   logits -> label map at the original size -> classes, PNG / RLE (thread pool)

The label map is the argmax of the logits interpolated bilinearly to each original
pixel, as one resize of the logits to the original size gives it (what eager torchvision
users do with `F.interpolate(out, size=original)`), computed only where it is in doubt
(class boundaries), so a large photo never holds C full-size float maps.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

from cvserve.app.queue import Job

from .imaging import decode_rgb, encode_png
from .masks import class_rles, label_map_png, render_semantic
from .preprocess import Geometry, preprocess
from .task import Prepared, Task

# Boundary pixels whose logits are interpolated at once (bounds memory: C floats each).
CHUNK_PIXELS = 200_000


def _source_index(n_out: int, n_in: int, scale: float, offset: float, n_src: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source rows (or columns) of each output pixel, as F.interpolate computes
    them (half-pixel centres, clamped to the edge): (lower [n_out], upper [n_out],
    weight of the upper [n_out]). Output pixel -> model input px -> logits px."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale + offset) * (n_src / n_in)
    src = (src - 0.5).clamp(0, n_src - 1)
    lower = src.floor().long()
    return lower, (lower + 1).clamp(max=n_src - 1), (src - lower).float()


@torch.no_grad()
def label_map_at_original(logits: torch.Tensor, geometry: Geometry) -> np.ndarray:
    """# [C, h, w] logits over the model input -> [H, W] class ids on the original image.

    The argmax of the logits interpolated bilinearly to each original pixel through the
    preprocessing geometry: for a plain resize exactly `F.interpolate(logits,
    size=original).argmax(0)` (the reference), and letterbox / crop offsets undone.

    Written by hand because interpolating all C maps costs C x H x W (300 ms for 21
    classes at 1024 x 1024 on 2 cores) while almost every pixel's answer is already
    known: a bilinear value is a convex combination of its four source cells, so where
    all four have the same argmax class that class wins there too. Only pixels whose
    source cells disagree (the class boundaries) are interpolated, in chunks.
    """
    classes, h, w = logits.shape
    height, width = geometry.original_hw
    in_h, in_w = geometry.input_hw
    (sx, sy), (ox, oy) = geometry.scale_xy, geometry.offset_xy
    y0, y1, wy = _source_index(height, in_h, sy, oy, h)
    x0, x1, wx = _source_index(width, in_w, sx, ox, w)
    source = logits.float()
    coarse = source.argmax(dim=0).to(torch.int32)  # [h, w]
    # A cell (i, j) is settled when its neighbours below / right (edge: itself) agree.
    below = torch.cat([coarse[1:], coarse[-1:]])
    right = torch.cat([coarse[:, 1:], coarse[:, -1:]], dim=1)
    corner = torch.cat([below[:, 1:], below[:, -1:]], dim=1)
    settled = (coarse == below) & (coarse == right) & (coarse == corner)  # [h, w]
    labels = coarse[y0][:, x0]  # [H, W]
    rows, cols = torch.nonzero(~settled[y0][:, x0], as_tuple=True)
    for start in range(0, len(rows), CHUNK_PIXELS):
        r, c = rows[start:start + CHUNK_PIXELS], cols[start:start + CHUNK_PIXELS]
        a, b = wy[r], wx[c]
        top = torch.lerp(source[:, y0[r], x0[c]], source[:, y0[r], x1[c]], b)  # [C, n]
        bottom = torch.lerp(source[:, y1[r], x0[c]], source[:, y1[r], x1[c]], b)
        labels[r, c] = torch.lerp(top, bottom, a).argmax(dim=0).to(torch.int32)
    return labels.numpy().astype(np.uint8 if classes <= 256 else np.int32)


class SemanticTask(Task):
    def prepare(self, job: Job) -> Prepared:
        image, info = decode_rgb(job.payload, self.settings.image_pixels)
        x, geometry = preprocess(image, self.cfg.input)
        keep = image if job.params.get("render") == "png" else None
        return Prepared(job, x, {"original_size": (info.height, info.width),
                                 "geometry": geometry, "image": keep})

    def batch_key(self, item: Prepared) -> tuple[int, ...]:
        """The input shape: with `resize = "shorter"` only images that resize to one size
        share a batch (photos of one aspect ratio do, whatever their size), so a batched
        answer equals an unbatched one exactly; fixed-size models batch anything."""
        return tuple(item.inputs.shape)

    def run(self, batch: list[Prepared]) -> list[np.ndarray]:
        out = self.backend.run({self.cfg.inputs[0]: np.stack([p.inputs for p in batch])})
        logits = out[self.cfg.outputs[0]]
        return [logits[i] for i in range(len(batch))]

    def finish(self, item: Prepared, output: np.ndarray) -> tuple[dict, bytes | None]:
        params = item.job.params
        logits = torch.from_numpy(np.asarray(output, dtype=np.float32))
        if logits.ndim != 3:
            raise ValueError(f"model {self.cfg.name}: expected logits [C, h, w] per image, "
                             f"got {tuple(logits.shape)}")
        if self.cfg.output.layout == "NHWC":
            logits = logits.permute(2, 0, 1)
        classes = logits.shape[0]
        label_map = label_map_at_original(logits, item.meta["geometry"])
        height, width = item.meta["original_size"]
        counts = np.bincount(label_map.ravel(), minlength=classes)
        present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c]]
        found = [{"label": self.label(c), "class_id": c,
                  "fraction": round(float(counts[c]) / label_map.size, 6)} for c in present]
        render = params.get("render")
        if render == "png":
            return {}, encode_png(render_semantic(item.meta["image"], label_map, self.labels))
        if render == "labels":
            return {}, label_map_png(label_map, max(classes, len(self.labels)))
        result: dict[str, Any] = {"image": {"width": width, "height": height},
                                  "classes": found}
        if params.get("mask_format", "png") == "rle":
            rles = class_rles(label_map)
            for entry in found:
                entry["mask"] = rles[entry["class_id"]]
        else:
            png = label_map_png(label_map, max(classes, len(self.labels)))
            result["label_map"] = {"format": "png", "encoding": "base64",
                                   "data": base64.b64encode(png).decode("ascii")}
        return result, None


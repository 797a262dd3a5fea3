"""/explain on a detector: which pixels each detection depends on (occlusion, D-RISE-style).

A grey patch slides over the photo (`patch` px every `stride` px, original pixels; default
a seventh of the shorter side and half of that). Every occluded copy runs through the
detector as an item of the job's stream, so the copies batch with each other and with
other requests' images. For each detection of the untouched photo (those above the score
threshold, at most `max_detections`, default 5), a copy's evidence for it is D-RISE's
similarity (Petsiuk et al. 2021, "Black-box Explanation of Object Detectors via Saliency
Maps") reduced to what a served detector outputs: the best IoU x score among the copy's
detections of the same class. Its map is the detection's own score minus that, per patch
position, negative values as 0, divided by the largest: where hiding the photo weakens the
detection most. Sliding patches rather than D-RISE's thousands of random masks: a map of
~150 forwards that a CPU can serve, and the same method as the classifiers' occlusion.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou
from torchvision.utils import draw_bounding_boxes

from cvserve.app.errors import InputError
from cvserve.app.queue import Job

from .explain_methods import grid_json, grid_region, occlusion_plan
from .imaging import encode_png
from .task import Prepared, Stream

FILL = (124, 116, 104)  # the occluding patch: ImageNet's mean colour, 0-255
DEFAULT_EXPLAINED = 5


def occluded(image: torch.Tensor, y: int, x: int, patch: int) -> torch.Tensor:
    """# [3, H, W] uint8 -> a copy with a grey square at (y, x)."""
    copy = image.clone()
    copy[:, y:y + patch, x:x + patch] = torch.tensor(FILL, dtype=image.dtype)[:, None, None]
    return copy


def maps_for(base: list[dict[str, Any]], copies: list[list[dict[str, Any]]],
             grid: tuple[int, int]) -> np.ndarray:
    """# base detections, each copy's detections -> [len(base), rows, cols] in [0, 1]."""
    if not base:
        return np.zeros((0, *grid), dtype=np.float32)
    boxes = torch.tensor([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in base])
    labels = torch.tensor([d["class_id"] for d in base])
    scores = torch.tensor([d["score"] for d in base])
    drops = torch.zeros(len(base), len(copies))
    for i, found in enumerate(copies):
        if not found:
            drops[:, i] = scores
            continue
        other = torch.tensor([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found])
        same = labels[:, None] == torch.tensor([d["class_id"] for d in found])[None]
        similarity = box_iou(boxes, other) * torch.tensor([d["score"] for d in found])[None]
        best = torch.where(same, similarity, torch.zeros_like(similarity)).amax(dim=1)
        drops[:, i] = scores - best
    maps = drops.clamp(min=0).reshape(len(base), *grid)
    top = maps.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    return (maps / top).numpy()


class DetectionExplainer:
    """DetectionTask's stream methods for /explain (a mixin: `self` is the task)."""

    def opens_stream(self, job: Job) -> bool:
        """/explain's jobs are streams (the photo and its occluded copies); /detect's not."""
        return "method" in job.params

    def open(self, job: Job) -> Stream:
        from .imaging import decode_rgb

        method = job.params.get("method")
        if method != "occlusion":
            raise InputError(f"a detector answers method=occlusion (D-RISE-style, per "
                             f"detection); got '{method}'")
        image, info = decode_rgb(job.payload, self.settings.image_pixels)  # type: ignore[attr-defined]
        layout = occlusion_plan(info.height, info.width, job.params, "the image")
        return Stream(job, 1 + len(layout["positions"]),
                      {"image": image, "info": info, **layout})

    def advance(self, stream: Stream) -> Prepared:
        index = stream.produced
        stream.produced += 1
        meta = stream.meta
        image = meta["image"]
        if index > 0:
            y, x = meta["positions"][index - 1]
            image = occluded(image, y, x, meta["patch"])
        item = self.prepare_image(stream.job, image, meta["info"])  # type: ignore[attr-defined]
        if index == 0:
            meta["item_meta"] = item.meta
        item.stream, item.index = stream, index
        return item

    def _detections(self, stream: Stream, output: Any, threshold: float,
                    limit: int) -> list[dict[str, Any]]:
        params = {"score_threshold": threshold, "max_detections": limit}
        job = dataclasses.replace(stream.job, params=params)
        result, _ = self.finish(Prepared(job, None, stream.meta["item_meta"]),  # type: ignore[attr-defined]
                                output)
        return result["detections"]

    def finish_stream(self, stream: Stream) -> tuple[dict[str, Any], bytes | None]:
        p, meta = stream.job.params, stream.meta
        thresholds = self.cfg.thresholds  # type: ignore[attr-defined]
        threshold = float(p.get("score_threshold", thresholds.score_threshold))
        limit = int(p.get("max_detections") or DEFAULT_EXPLAINED)
        base = self._detections(stream, stream.outputs[0], threshold, limit)
        # A copy's detections down to the model's own floor: a weakened detection still
        # counts as evidence for the one it weakened.
        copies = [self._detections(stream, out, 0.0, thresholds.max_detections)
                  for out in stream.outputs[1:]]
        maps = maps_for(base, copies, meta["grid"])
        info = meta["info"]
        region = grid_region(meta["patch"], meta["stride"], meta["grid"])  # original px
        if p.get("render") in ("overlay", "heatmap"):
            return {}, encode_png(self.render_detection(meta["image"], base, maps, region,
                                                        p.get("render") == "overlay"))
        for detection, heat in zip(base, maps, strict=True):
            detection["heatmap"] = {"shape": list(heat.shape),
                                    "data": grid_json(heat), "region": region}
        return {"method": "occlusion", "detections": base,
                "image": {"width": info.width, "height": info.height},
                "occlusion": {"patch": meta["patch"], "stride": meta["stride"],
                              "positions": len(meta["positions"])}}, None

    def render_detection(self, image: torch.Tensor, base: list[dict[str, Any]],
                         maps: np.ndarray, region: list[float], overlay: bool) -> torch.Tensor:
        """The best detection's map over the photo (JET, half opacity), its box drawn."""
        from .explain import colour_map

        if not base:
            return image
        h, w = image.shape[-2:]
        heat = torch.zeros(h, w)
        x1, y1, x2, y2 = (int(round(v)) for v in region)
        cell = torch.nn.functional.interpolate(torch.from_numpy(maps[0])[None, None],
                                               size=(y2 - y1, x2 - x1), mode="bilinear",
                                               align_corners=False)[0, 0]
        ys, xs = slice(max(0, y1), min(h, y2)), slice(max(0, x1), min(w, x2))
        heat[ys, xs] = cell[ys.start - y1:ys.stop - y1, xs.start - x1:xs.stop - x1]
        colour = colour_map(heat)
        out = (0.5 * image.float() + 0.5 * colour.float()).round().byte() if overlay else colour
        box = torch.tensor([[base[0]["box"][k] for k in ("x1", "y1", "x2", "y2")]])
        return draw_bounding_boxes(out, box, [f"{base[0]['label']} {base[0]['score']:.2f}"],
                                   colors="white", width=2)

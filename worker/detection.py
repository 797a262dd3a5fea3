"""Object detection: torchvision-style detectors (Faster R-CNN, RetinaNet, SSD, FCOS).

The artifact is the detector's *core* (backbone, heads, box decoding, NMS) exported by
cvserve.models.export; resizing, normalizing and mapping boxes back run here with
torchvision's own GeneralizedRCNNTransform, so a served result equals the eager model's.

    prepare:  decode -> float [0,1] -> normalize -> resize       (per image, thread pool)
    run:      pad to a common size -> core -> boxes in resized px (per batch, model thread)
    finish:   boxes back to original px -> threshold -> JSON / PNG (per image, thread pool)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.utils import draw_bounding_boxes

from cvserve.app.queue import Job

from .imaging import decode_rgb, encode_png
from .task import Prepared, Task


class DetectionTask(Task):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.cfg.input
        self.transform = GeneralizedRCNNTransform(
            min_size=spec.min_size, max_size=spec.max_size, image_mean=list(spec.mean),
            image_std=list(spec.std), size_divisible=spec.size_divisible,
            fixed_size=spec.fixed_size,
        ).eval()
        self.labels = self.cfg.label_names()

    def prepare(self, job: Job) -> Prepared:
        image, info = decode_rgb(job.payload, self.settings.image_pixels)
        x = image.to(torch.float32).mul_(self.cfg.input.scale)
        if self.cfg.input.color == "BGR":
            x = x.flip(0)
        x = self.transform.normalize(x)
        x, _ = self.transform.resize(x, None)  # [3, h, w] float, model pixels
        meta = {"original_size": (info.height, info.width), "resized_size": tuple(x.shape[-2:]),
                "image": image if job.params.get("render") == "png" else None}
        return Prepared(job, x, meta)

    def batch_key(self, item: Prepared) -> tuple[int, int]:
        """The padded input shape. Batching only images that pad to the same shape keeps a
        batched result equal to the unbatched one (and to eager torchvision): a
        convolution near an image's edge sees that image's own padding either way. Photos
        of one aspect ratio share a key whatever their size."""
        d = self.cfg.input.size_divisible
        h, w = item.meta["resized_size"]
        return (-(-h // d) * d, -(-w // d) * d)

    def run(self, batch: list[Prepared]) -> list[dict[str, np.ndarray]]:
        images = self.transform.batch_images([p.inputs for p in batch],
                                             self.cfg.input.size_divisible)
        sizes = np.array([p.meta["resized_size"] for p in batch], dtype=np.int64)
        out = self.backend.run({"images": images.numpy(), "image_sizes": sizes})
        results = []
        for i in range(len(batch)):
            n = int(out["counts"][i])
            results.append({"boxes": out["boxes"][i, :n], "scores": out["scores"][i, :n],
                            "labels": out["labels"][i, :n]})
        return results

    def finish(self, item: Prepared, output: dict[str, np.ndarray]) -> tuple[dict, bytes | None]:
        params = item.job.params
        threshold = float(params.get("score_threshold", self.cfg.thresholds.score_threshold))
        max_det = int(params.get("max_detections", self.cfg.thresholds.max_detections))
        boxes = resize_boxes(torch.from_numpy(output["boxes"]), list(item.meta["resized_size"]),
                             list(item.meta["original_size"]))  # [N, 4] xyxy, original px
        scores, class_ids = output["scores"], output["labels"]
        keep = np.flatnonzero(scores >= threshold)[:max_det]  # the core sorts by score
        detections = [
            {"label": self._label(int(class_ids[i])), "class_id": int(class_ids[i]),
             "score": round(float(scores[i]), 5),
             "box": dict(zip(("x1", "y1", "x2", "y2"),
                             (round(float(v), 2) for v in boxes[i].tolist()), strict=True))}
            for i in keep
        ]
        height, width = item.meta["original_size"]
        result = {"detections": detections, "image": {"width": width, "height": height}}
        body = None
        if params.get("render") == "png":
            body = encode_png(self._draw(item.meta["image"], boxes[keep], detections))
        return result, body

    def _label(self, class_id: int) -> str:
        if 0 <= class_id < len(self.labels):
            return self.labels[class_id]
        return str(class_id)

    @staticmethod
    def _draw(image: torch.Tensor, boxes: torch.Tensor, detections: list[dict]) -> torch.Tensor:
        if not detections:
            return image
        names = [f"{d['label']} {d['score']:.2f}" for d in detections]
        width = max(2, round(max(image.shape[-2:]) / 300))
        return draw_bounding_boxes(image, boxes, labels=names, width=width, colors="red")


"""Object detection, for two kinds of artifact.

torchvision detectors (Faster R-CNN, RetinaNet, SSD, FCOS; `resize = "rcnn"`): the artifact
is the detector's *core* (backbone, heads, box decoding, NMS) exported by
cvserve.models.export; resizing, normalizing and mapping boxes back run here with
torchvision's own GeneralizedRCNNTransform, so a served result equals the eager model's.

    prepare:  decode -> float [0,1] -> normalize -> resize       (per image, thread pool)
    run:      pad to a common size -> core -> boxes in resized px (per batch, model thread)
    finish:   boxes back to original px -> threshold -> JSON / PNG (per image, thread pool)

Models as their exporters left them (YOLOX, YOLOv5/v8, DETR; any other `resize`): the
declared preprocessing (worker/preprocess.py) brings every image to the fixed input
size, the raw outputs are decoded per image by the named decoder (worker/decoders.py,
with NMS where the model has none), and the recorded geometry maps boxes back.

    prepare:  decode -> resize/letterbox/crop -> colours, scale, layout (thread pool)
    run:      stack -> model -> raw outputs, split per image         (model thread)
    finish:   decode + NMS at the request's threshold -> original px  (thread pool)

Instance segmenters (Mask R-CNN, YOLOv8-seg) answer here too: each detection's mask is
pasted at the original resolution (as the eager model pastes it) and encoded as COCO RLE
(or polygons) one at a time in `finish`, off the model thread; keypoint R-CNN adds
per-detection keypoints in original pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    resize_boxes,
    resize_keypoints,
)

from cvserve.app.queue import Job

from . import decoders
from .detection_explain import DetectionExplainer
from .gpu import Staged, decode_rgb_on, is_cuda, record_ready, staging
from .imaging import decode_rgb, encode_png
from .masks import COCO_SKELETON, encode_rle, mask_polygons, paste_masks, render_instances
from .preprocess import check_rcnn_size, preprocess
from .task import Prepared, Task
from .torchscript_backend import TorchScriptBackend

# Per-detection outputs of instance (masks [K, M, M]) and keypoint cores (keypoints
# [K, P, 3], keypoint_scores [K, P]), beside boxes / scores / labels.
EXTRA_OUTPUTS = ("masks", "keypoints", "keypoint_scores")


class DetectionTask(DetectionExplainer, Task):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.cfg.input
        self.transform = GeneralizedRCNNTransform(
            min_size=spec.min_size, max_size=spec.max_size, image_mean=list(spec.mean),
            image_std=list(spec.std), size_divisible=spec.size_divisible,
            fixed_size=spec.fixed_size,
        ).eval()
        self.keypoint_names = self.cfg.keypoint_names()
        # A torchvision detector on a GPU: decode, normalize and resize on the device, on
        # the decode thread's own stream, so that the next batch's copies and preprocessing
        # overlap this batch's compute (worker/gpu.py); the host sends uint8 pixels (or,
        # with gpu_jpeg_decode, the JPEG bytes), not 4-byte floats of the resized image.
        self.on_device = (self.rcnn and isinstance(self.backend, TorchScriptBackend)
                          and is_cuda(self.backend.device))

    @property
    def rcnn(self) -> bool:
        return self.cfg.input.resize == "rcnn"

    def prepare(self, job: Job) -> Prepared:
        if self.on_device:
            return self._prepare_on_device(job)
        image, info = decode_rgb(job.payload, self.settings.image_pixels)
        keep = image if job.params.get("render") == "png" else None
        return self.prepare_image(job, image, info, keep)

    def prepare_image(self, job: Job, image: torch.Tensor, info: Any,
                      keep: torch.Tensor | None = None) -> Prepared:
        """A decoded image (# [3, H, W] uint8 on the host) as the model's input; on a GPU
        it moves there and is staged as prepare() stages it."""
        if self.on_device:
            device = self.backend.device
            with staging(device):
                x = self._rcnn_input(image.to(device, non_blocking=True))
                staged = Staged({"image": x}, record_ready())
            return Prepared(job, staged, {"original_size": (info.height, info.width),
                                          "resized_size": tuple(x.shape[-2:]), "image": keep})
        if not self.rcnn:
            x, geometry = preprocess(image, self.cfg.input)
            return Prepared(job, x, {"original_size": (info.height, info.width),
                                     "geometry": geometry, "image": keep})
        x = self._rcnn_input(image)
        meta = {"original_size": (info.height, info.width), "resized_size": tuple(x.shape[-2:]),
                "image": keep}
        return Prepared(job, x, meta)

    def _rcnn_input(self, image: torch.Tensor) -> torch.Tensor:
        """# [3, H, W] uint8 -> [3, h, w] float, normalized and resized (model pixels), on
        the image's device."""
        check_rcnn_size(tuple(image.shape[-2:]), self.cfg.input)
        x = image.to(torch.float32).mul_(self.cfg.input.scale)
        if self.cfg.input.color == "BGR":
            x = x.flip(0)
        x = self.transform.normalize(x)
        x, _ = self.transform.resize(x, None)
        return x

    def _prepare_on_device(self, job: Job) -> Prepared:
        """prepare() on the GPU: the input stays there, staged for the model thread."""
        device = self.backend.device
        with staging(device):
            image, info = decode_rgb_on(job.payload, self.settings.image_pixels, device,
                                        nvjpeg=getattr(self.settings, "gpu_jpeg_decode", False))
            x = self._rcnn_input(image)
            staged = Staged({"image": x}, record_ready())
            keep = image.cpu() if job.params.get("render") == "png" else None
        meta = {"original_size": (info.height, info.width), "resized_size": tuple(x.shape[-2:]),
                "image": keep}
        return Prepared(job, staged, meta)

    def batch_key(self, item: Prepared) -> tuple[int, int] | None:
        """The padded input shape. Batching only images that pad to the same shape keeps a
        batched result equal to the unbatched one (and to eager torchvision): a
        convolution near an image's edge sees that image's own padding either way. Photos
        of one aspect ratio share a key whatever their size. Fixed-size models: any."""
        if not self.rcnn:
            return None
        d = self.cfg.input.size_divisible
        h, w = item.meta["resized_size"]
        return (-(-h // d) * d, -(-w // d) * d)

    def run(self, batch: list[Prepared]) -> list[dict[str, np.ndarray]]:
        if not self.rcnn:
            out = self.backend.run({self.cfg.inputs[0]: np.stack([p.inputs for p in batch])})
            return [{k: v[i] for k, v in out.items()} for i in range(len(batch))]
        sizes = np.array([p.meta["resized_size"] for p in batch], dtype=np.int64)
        if self.on_device:
            out = self._run_on_device(batch, sizes)
        else:
            images = self.transform.batch_images([p.inputs for p in batch],
                                                 self.cfg.input.size_divisible)
            out = self.backend.run({"images": images.numpy(), "image_sizes": sizes})
        # Instance and keypoint cores add masks / keypoints per detection (same padding).
        names = [k for k in ("boxes", "scores", "labels", *EXTRA_OUTPUTS) if k in out]
        counts = [int(c) for c in out["counts"]]
        return [{k: out[k][i, :n] for k in names} for i, n in enumerate(counts)]

    def _run_on_device(self, batch: list[Prepared], sizes: np.ndarray) -> dict[str, np.ndarray]:
        """Pad the staged images into one batch on this thread's compute stream (which waits
        for each item's staging; the thread does not) and run it. The sizes stay on the
        host: the core reads them with int()."""
        backend = self.backend
        assert isinstance(backend, TorchScriptBackend)  # self.on_device says so
        with backend.compute():
            images = self.transform.batch_images([p.inputs.take()["image"] for p in batch],
                                                 self.cfg.input.size_divisible)
            return backend.run_staged(Staged({"images": images,
                                              "image_sizes": torch.from_numpy(sizes)}))

    def finish(self, item: Prepared, output: dict[str, np.ndarray]) -> tuple[dict, bytes | None]:
        params = item.job.params
        threshold = float(params.get("score_threshold", self.cfg.thresholds.score_threshold))
        max_det = int(params.get("max_detections", self.cfg.thresholds.max_detections))
        height, width = item.meta["original_size"]
        keypoints = None
        if self.rcnn:
            boxes = resize_boxes(torch.from_numpy(output["boxes"]),
                                 list(item.meta["resized_size"]),
                                 [height, width])  # [N, 4] xyxy, original px
            scores, class_ids = output["scores"], output["labels"]
            keep = np.flatnonzero(scores >= threshold)[:max_det]  # the core sorts by score
            boxes, scores, class_ids = boxes[keep], scores[keep], class_ids[keep]
            masks = (paste_masks(output["masks"][keep], boxes, (height, width))
                     if "masks" in output else None)
            if "keypoints" in output:
                keypoints = resize_keypoints(torch.from_numpy(output["keypoints"][keep]),
                                             list(item.meta["resized_size"]), [height, width])
                keypoints[..., 2] = torch.from_numpy(output["keypoint_scores"][keep])
        else:
            found = self._decode(output, threshold, max_det)
            geometry = item.meta["geometry"]
            boxes = torch.from_numpy(geometry.boxes_to_original(found.boxes))
            scores, class_ids = found.scores, found.class_ids
            masks = None if found.masks is None else (
                geometry.map_to_original(torch.from_numpy(m), "bilinear").numpy() > 0.5
                for m in found.masks)
        detections = [
            {"label": self.label(int(class_ids[i])), "class_id": int(class_ids[i]),
             "score": round(float(scores[i]), 5),
             "box": dict(zip(("x1", "y1", "x2", "y2"),
                             (round(float(v), 2) for v in boxes[i].tolist()), strict=True))}
            for i in range(len(scores))
        ]
        if params.get("render") == "png":
            captions = [f"{d['label']} {d['score']:.2f}" for d in detections]
            image = render_instances(item.meta["image"], boxes, captions, masks, keypoints,
                                     COCO_SKELETON if len(self.keypoint_names) == 17 else None)
            return {}, encode_png(image)
        if masks is not None:  # encoded as pasted: one full-size mask in memory at a time
            polygons = params.get("mask_format") == "polygon"
            for detection, mask in zip(detections, masks, strict=True):
                detection["mask"] = mask_polygons(mask) if polygons else encode_rle(mask)
        if keypoints is not None:
            for detection, points in zip(detections, keypoints.tolist(), strict=True):
                detection["keypoints"] = [
                    {"name": self._keypoint(k), "x": round(x, 2), "y": round(y, 2),
                     "score": round(score, 4)} for k, (x, y, score) in enumerate(points)]
        return {"detections": detections, "image": {"width": width, "height": height}}, None

    def _decode(self, output: dict[str, np.ndarray], threshold: float,
                max_det: int) -> decoders.Detections:
        """Raw outputs of one image -> detections in model-input pixels."""
        spec, hw = self.cfg.output, tuple(self.cfg.input.size)  # type: ignore[arg-type]
        first = output[self.cfg.outputs[0]]
        name = spec.decoder
        if name == "yolox":
            return decoders.decode_yolox(first, hw, spec, threshold, max_det)
        if name == "yolov5":
            return decoders.decode_yolov5(first, hw, spec, threshold, max_det)
        if name == "yolov8":
            return decoders.decode_yolov8(first, hw, spec, threshold, max_det,
                                          len(self.labels))
        if name == "yolov8-seg":
            return decoders.decode_yolov8_seg(first, output[self.cfg.outputs[1]], hw, spec,
                                              threshold, max_det, len(self.labels))
        if name == "detr":
            return decoders.decode_detr(first, output[self.cfg.outputs[1]], hw, spec,
                                        threshold, max_det)
        raise ValueError(f"model {self.cfg.name}: decoder '{name}' does not give detections")

    def _keypoint(self, index: int) -> str:
        names = self.keypoint_names
        return names[index] if index < len(names) else str(index)



"""Box and mask mAP of a detector on held-out synthetic scenes, scored by pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .synthetic import Scene, coco_instances, make_scene

HELD_OUT_SEED = 1_000_000  # training draws seeds far below this


def coco_ground_truth(scenes: list[Scene]) -> COCO:
    gt = COCO()
    gt.dataset = coco_instances(scenes)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def box_map(gt: COCO, detections: list[dict]) -> dict[str, float]:
    """detections: COCO results ({image_id, category_id, bbox xywh, score})."""
    return _coco_map(gt, detections, "bbox")


def mask_map(gt: COCO, detections: list[dict]) -> dict[str, float]:
    """detections: COCO results with `segmentation` (RLE {size, counts})."""
    return _coco_map(gt, detections, "segm")


def _coco_map(gt: COCO, detections: list[dict], iou_type: str) -> dict[str, float]:
    if not detections:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1])}


def evaluate_eager(model: torch.nn.Module, n: int = 100) -> dict[str, float]:
    """The eager model on `n` held-out scenes: box mAP, and for a model that outputs masks
    (Mask R-CNN) mask mAP too (`mask_map`, `mask_map50`; probabilities cut at 0.5)."""
    scenes = [make_scene(HELD_OUT_SEED + i) for i in range(n)]
    results = []
    model.eval()
    with torch.no_grad():
        for image_id, scene in enumerate(scenes, start=1):
            x = torch.from_numpy(np.array(scene.image)).permute(2, 0, 1).float() / 255
            out = model([x])[0]
            for k, (box, score, label) in enumerate(zip(
                    out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(),
                    strict=True)):
                result = {"image_id": image_id, "category_id": label, "score": score,
                          "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
                if "masks" in out:
                    mask = (out["masks"][k, 0] > 0.5).numpy().astype(np.uint8)
                    rle = mask_utils.encode(np.asfortranarray(mask))
                    result["segmentation"] = {"size": rle["size"],
                                              "counts": rle["counts"].decode()}
                results.append(result)
    gt = coco_ground_truth(scenes)
    scores = box_map(gt, results)
    if results and "segmentation" in results[0]:
        masks = mask_map(gt, results)
        scores.update(mask_map=masks["map"], mask_map50=masks["map50"])
    return scores

"""Output decoders: one image's raw model outputs -> boxes, masks or classes.

Each decoder follows the postprocess of the code that trained the model (YOLOX demo,
YOLOv5 / Ultralytics `non_max_suppression`, DETR `PostProcess`), so that a model exported
by anyone is served as its authors evaluate it. Inputs are numpy arrays with the batch
dimension already removed; results are in model-input pixels, and the task maps them back
to the original image with what its preprocess recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_convert, nms

from .repository import OutputSpec


@dataclass
class Detections:
    """One image's detections, best first."""

    boxes: np.ndarray  # [N, 4] float32 xyxy, model-input pixels
    scores: np.ndarray  # [N] float32, descending
    class_ids: np.ndarray  # [N] int64 (0-based index into the model's labels)
    masks: np.ndarray | None = None  # [N, H_in, W_in] float32 in [0, 1] (yolov8-seg)


def _tensor(array: np.ndarray, name: str, ndim: int) -> torch.Tensor:
    """A float32 tensor that owns its memory, after checking the number of dimensions."""
    array = np.asarray(array)
    if array.ndim != ndim:
        raise ValueError(f"output '{name}': expected {ndim} dimensions (batch dimension "
                         f"removed), got shape {array.shape}")
    # A copy, not torch.from_numpy(array) alone: from_numpy warns on read-only arrays
    # (which backends may return), and the copy turns float16 outputs into float32.
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _to_detections(boxes: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor,
                   masks: torch.Tensor | None = None) -> Detections:
    return Detections(
        boxes=boxes.reshape(-1, 4).numpy().astype(np.float32),
        scores=scores.numpy().astype(np.float32),
        class_ids=class_ids.numpy().astype(np.int64),
        masks=None if masks is None else masks.numpy().astype(np.float32),
    )


def _select(boxes_xyxy: torch.Tensor, class_scores: torch.Tensor, spec: OutputSpec,
            score_threshold: float, max_detections: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """YOLO selection: best class per box, threshold, best `max_candidates`, NMS.

    boxes_xyxy [A, 4], class_scores [A, C] -> (anchor index [N], score [N], class id [N]),
    best first, N <= max_detections.
    """
    scores, class_ids = class_scores.max(dim=1)  # [A], [A]
    index = torch.nonzero(scores >= score_threshold).squeeze(1)
    if index.numel() > spec.max_candidates:
        index = index[scores[index].topk(spec.max_candidates).indices]
    boxes, scores, class_ids = boxes_xyxy[index], scores[index], class_ids[index]
    if spec.class_agnostic_nms:
        keep = nms(boxes, scores, spec.nms_iou)
    else:
        keep = batched_nms(boxes, scores, class_ids, spec.nms_iou)
    keep = keep[:max_detections]  # nms returns indices by descending score
    return index[keep], scores[keep], class_ids[keep]


def _yolo_layout(pred: np.ndarray, name: str, columns: int) -> torch.Tensor:
    """Ultralytics [columns, A] or [A, columns] -> [A, columns]."""
    x = _tensor(pred, name, 2)
    if x.shape[0] == columns:
        return x.T
    if x.shape[1] == columns:
        return x
    raise ValueError(f"output '{name}': expected shape [{columns}, anchors] or "
                     f"[anchors, {columns}], got {tuple(x.shape)}")


def _yolox_grid(input_hw: tuple[int, int],
                strides: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor-point grid cells [A, 2] (x, y) and their strides [A, 1], in output order."""
    height, width = input_hw
    cells, cell_strides = [], []
    for stride in strides:
        ys, xs = torch.meshgrid(torch.arange(height // stride), torch.arange(width // stride),
                                indexing="ij")  # row-major: y outer, x inner
        cells.append(torch.stack((xs, ys), dim=-1).reshape(-1, 2))
        cell_strides.append(torch.full((cells[-1].shape[0], 1), stride))
    return torch.cat(cells).float(), torch.cat(cell_strides).float()


@torch.no_grad()
def decode_yolox(pred: np.ndarray, input_hw: tuple[int, int], spec: OutputSpec,
                 score_threshold: float, max_detections: int) -> Detections:
    """YOLOX raw head output [A, 5 + C] (dx, dy, log w, log h, obj, classes) -> detections."""
    x = _tensor(pred, "yolox", 2)  # [A, 5 + C]
    grid, strides = _yolox_grid(input_hw, spec.strides)
    if x.shape[0] != grid.shape[0] or x.shape[1] < 6:
        raise ValueError(
            f"yolox output: expected [{grid.shape[0]}, 5 + classes] for input {input_hw} and "
            f"strides {spec.strides}, got {tuple(x.shape)} (check input.size and "
            f"output.strides in model.toml)")
    centres = (x[:, :2] + grid) * strides  # [A, 2] input px
    sizes = x[:, 2:4].exp() * strides  # [A, 2] input px
    boxes = box_convert(torch.cat((centres, sizes), dim=1), "cxcywh", "xyxy")
    conf = x[:, 4:].sigmoid() if spec.sigmoid else x[:, 4:]  # [A, 1 + C]
    index, scores, class_ids = _select(boxes, conf[:, :1] * conf[:, 1:], spec,
                                       score_threshold, max_detections)
    return _to_detections(boxes[index], scores, class_ids)


@torch.no_grad()
def decode_yolov5(pred: np.ndarray, input_hw: tuple[int, int], spec: OutputSpec,
                  score_threshold: float, max_detections: int) -> Detections:
    """YOLOv5 output [A, 5 + C] (cx, cy, w, h in input px, obj, classes) -> detections."""
    x = _tensor(pred, "yolov5", 2)  # [A, 5 + C]
    if x.shape[1] < 6:
        raise ValueError(f"yolov5 output: expected [anchors, 5 + classes], got {tuple(x.shape)}")
    boxes = box_convert(x[:, :4], "cxcywh", "xyxy")
    conf = x[:, 4:].sigmoid() if spec.sigmoid else x[:, 4:]  # [A, 1 + C]
    index, scores, class_ids = _select(boxes, conf[:, :1] * conf[:, 1:], spec,
                                       score_threshold, max_detections)
    return _to_detections(boxes[index], scores, class_ids)


@torch.no_grad()
def decode_yolov8(pred: np.ndarray, input_hw: tuple[int, int], spec: OutputSpec,
                  score_threshold: float, max_detections: int, num_classes: int) -> Detections:
    """Ultralytics YOLOv8 output [4 + C, A] or [A, 4 + C] (cx, cy, w, h, classes)."""
    x = _yolo_layout(pred, "yolov8", 4 + num_classes)  # [A, 4 + C]
    boxes = box_convert(x[:, :4], "cxcywh", "xyxy")
    conf = x[:, 4:].sigmoid() if spec.sigmoid else x[:, 4:]  # [A, C]
    index, scores, class_ids = _select(boxes, conf, spec, score_threshold, max_detections)
    return _to_detections(boxes[index], scores, class_ids)


@torch.no_grad()
def decode_yolov8_seg(pred: np.ndarray, protos: np.ndarray, input_hw: tuple[int, int],
                      spec: OutputSpec, score_threshold: float, max_detections: int,
                      num_classes: int) -> Detections:
    """Ultralytics YOLOv8-seg: pred [4 + C + M, A] (or [A, 4 + C + M]), protos [M, h, w].

    Masks follow Ultralytics `process_mask_native`: coefficients @ prototypes, bilinear to
    the input size, zero outside the box. Upsampling the logits and then applying sigmoid
    makes `mask > 0.5` equal Ultralytics' `logits > 0` exactly.
    """
    p = _tensor(protos, "protos", 3)  # [M, h, w]
    num_protos, proto_h, proto_w = p.shape
    x = _yolo_layout(pred, "yolov8-seg", 4 + num_classes + num_protos)  # [A, 4 + C + M]
    boxes = box_convert(x[:, :4], "cxcywh", "xyxy")
    conf = x[:, 4:4 + num_classes]
    conf = conf.sigmoid() if spec.sigmoid else conf  # [A, C]
    index, scores, class_ids = _select(boxes, conf, spec, score_threshold, max_detections)
    boxes = boxes[index]  # [N, 4]
    height, width = input_hw
    coeffs = x[index, 4 + num_classes:]  # [N, M]
    logits = (coeffs @ p.reshape(num_protos, -1)).reshape(-1, 1, proto_h, proto_w)
    if logits.shape[0]:
        logits = F.interpolate(logits, size=(height, width), mode="bilinear",
                               align_corners=False)
    masks = logits.reshape(-1, height, width).sigmoid()  # [N, H_in, W_in]
    # Ultralytics crop_mask: pixel (r, c) lies in the box when x1 <= c < x2, y1 <= r < y2.
    cols = torch.arange(width, dtype=torch.float32)[None, None, :]  # [1, 1, W_in]
    rows = torch.arange(height, dtype=torch.float32)[None, :, None]  # [1, H_in, 1]
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))  # each [N, 1, 1]
    inside = (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)  # [N, H_in, W_in]
    return _to_detections(boxes, scores, class_ids, masks * inside)


@torch.no_grad()
def decode_detr(logits: np.ndarray, boxes: np.ndarray, input_hw: tuple[int, int],
                spec: OutputSpec, score_threshold: float, max_detections: int) -> Detections:
    """DETR family: logits [Q, C (+1 no-object)], boxes [Q, 4] cxcywh in [0, 1] -> detections.

    As DETR's `PostProcess`: a query's score is its best real class's probability (with
    softmax, after dropping the no-object column); no NMS.
    """
    q_logits = _tensor(logits, "logits", 2)  # [Q, C (+1)]
    q_boxes = _tensor(boxes, "boxes", 2)  # [Q, 4]
    if q_boxes.shape != (q_logits.shape[0], 4):
        raise ValueError(f"detr boxes: expected [{q_logits.shape[0]}, 4] (one per query), "
                         f"got {tuple(q_boxes.shape)}")
    if spec.activation == "softmax":
        probs = q_logits.softmax(dim=-1)[:, :-1]
    elif spec.activation == "sigmoid":
        probs = q_logits.sigmoid()
    else:
        probs = q_logits
    if probs.shape[1] < 1:
        raise ValueError(f"detr logits: expected [queries, classes + 1] for softmax, got "
                         f"{tuple(q_logits.shape)}")
    scores, class_ids = probs.max(dim=1)  # [Q], [Q]
    order = scores.argsort(descending=True, stable=True)
    order = order[scores[order] >= score_threshold][:max_detections]
    height, width = input_hw
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    xyxy = box_convert(q_boxes[order], "cxcywh", "xyxy") * scale
    return _to_detections(xyxy, scores[order], class_ids[order])


@torch.no_grad()
def classify(logits: np.ndarray, spec: OutputSpec, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class logits [C] or [1, C] -> (class_ids [k] int64, scores [k] float32), best first."""
    x = torch.from_numpy(np.array(logits, dtype=np.float32))
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1 or x.shape[0] < 1:
        raise ValueError(f"classification logits: expected [classes] or [1, classes], "
                         f"got {tuple(x.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if spec.activation == "softmax":
        x = x.softmax(dim=0)
    elif spec.activation == "sigmoid":
        x = x.sigmoid()
    scores, class_ids = x.topk(min(top_k, x.shape[0]))
    return class_ids.numpy().astype(np.int64), scores.numpy().astype(np.float32)

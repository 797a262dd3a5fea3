"""Output decoders: hand-built raw outputs whose detections, masks and labels are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvserve.worker.decoders import (
    Detections,
    classify,
    decode_detr,
    decode_yolov5,
    decode_yolov8,
    decode_yolov8_seg,
    decode_yolox,
)
from cvserve.worker.preprocess import Geometry
from cvserve.worker.repository import OutputSpec
from cvserve.worker.segmentation import label_map_at_original

THRESHOLD = 0.3
# One scene for every YOLO variant, as (xyxy box in input px, class scores, objectness).
# DUP_A overlaps BOX_A (IoU 0.91, same class, lower score): NMS removes it. DUP_B overlaps
# BOX_B (IoU 0.91) with another class: class-aware NMS keeps it, class-agnostic removes it.
# BOX_A's second-best class (0.9 * 0.5 = 0.45 > THRESHOLD) must not be reported: one class
# per box. FAINT scores under THRESHOLD.
BOX_A = ((10, 12, 42, 40), (0.8, 0.5, 0.0), 0.9)  # class 0, score 0.72
DUP_A = ((11, 12, 43, 41), (0.5, 0.0, 0.0), 1.0)  # class 0, score 0.5
BOX_B = ((50, 8, 90, 56), (0.0, 0.0, 0.6), 1.0)  # class 2, score 0.6
DUP_B = ((52, 10, 90, 56), (0.0, 0.55, 0.0), 1.0)  # class 1, score 0.55
FAINT = ((0, 40, 20, 60), (0.0, 0.0, 0.2), 1.0)  # class 2, score 0.2
SCENE = (BOX_A, DUP_A, BOX_B, DUP_B, FAINT)
CLASS_AWARE = ([BOX_A[0], BOX_B[0], DUP_B[0]], [0.72, 0.6, 0.55], [0, 2, 1])
CLASS_AGNOSTIC = ([BOX_A[0], BOX_B[0]], [0.72, 0.6], [0, 2])


def assert_detections(det: Detections, expected: tuple[list, list, list],
                      atol: float = 1e-4) -> None:
    boxes, scores, class_ids = expected
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(boxes), 4)
    assert det.scores.dtype == np.float32 and det.class_ids.dtype == np.int64
    np.testing.assert_allclose(det.boxes, np.array(boxes, dtype=np.float32).reshape(-1, 4),
                               atol=atol)
    np.testing.assert_allclose(det.scores, scores, atol=atol)
    assert det.class_ids.tolist() == class_ids


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p)).astype(np.float32)


# --- YOLOX: 64x96 input, strides 8/16/32 -> 8*12 + 4*6 + 2*3 = 126 anchor points ---------

YOLOX_HW = (64, 96)
YOLOX_CELLS = {BOX_A: (8, 3, 3), DUP_A: (16, 1, 1), BOX_B: (16, 4, 2), DUP_B: (32, 2, 1),
               FAINT: (8, 1, 6)}  # (stride, grid x, grid y) of the cell holding the centre
YOLOX_OFFSET = {8: 0, 16: 96, 32: 120}  # first anchor index of each stride


def yolox_pred(sigmoid: bool = False) -> np.ndarray:
    pred = np.zeros((126, 8), dtype=np.float32)
    for item in SCENE:
        (x1, y1, x2, y2), classes, obj = item
        stride, gx, gy = YOLOX_CELLS[item]
        row = YOLOX_OFFSET[stride] + gy * (YOLOX_HW[1] // stride) + gx
        pred[row, :4] = ((x1 + x2) / 2 / stride - gx, (y1 + y2) / 2 / stride - gy,
                         math.log((x2 - x1) / stride), math.log((y2 - y1) / stride))
        pred[row, 4:] = (obj, *classes)
    if sigmoid:
        pred[:, 4:] = logit(pred[:, 4:])
    return pred


def test_yolox_keeps_best_class_per_anchor_and_nms_within_class() -> None:
    det = decode_yolox(yolox_pred(), YOLOX_HW, OutputSpec(decoder="yolox"), THRESHOLD, 100)
    assert_detections(det, CLASS_AWARE)
    assert det.masks is None


def test_yolox_class_agnostic_nms_removes_other_class_duplicate() -> None:
    spec = OutputSpec(decoder="yolox", class_agnostic_nms=True)
    assert_detections(decode_yolox(yolox_pred(), YOLOX_HW, spec, THRESHOLD, 100),
                      CLASS_AGNOSTIC)


def test_yolox_score_threshold_max_detections_and_candidates() -> None:
    spec = OutputSpec(decoder="yolox")
    only_a_b = ([BOX_A[0], BOX_B[0]], [0.72, 0.6], [0, 2])
    assert_detections(decode_yolox(yolox_pred(), YOLOX_HW, spec, 0.58, 100), only_a_b)
    assert_detections(decode_yolox(yolox_pred(), YOLOX_HW, spec, THRESHOLD, 2), only_a_b)
    spec = OutputSpec(decoder="yolox", max_candidates=2)
    assert_detections(decode_yolox(yolox_pred(), YOLOX_HW, spec, THRESHOLD, 100), only_a_b)
    none = decode_yolox(yolox_pred(), YOLOX_HW, OutputSpec(), 0.99, 100)
    assert none.boxes.shape == (0, 4) and none.scores.shape == (0,)


def test_yolox_sigmoid_option_decodes_raw_logits() -> None:
    spec = OutputSpec(decoder="yolox", sigmoid=True)
    assert_detections(decode_yolox(yolox_pred(sigmoid=True), YOLOX_HW, spec, THRESHOLD, 100),
                      CLASS_AWARE)


def test_yolox_wrong_anchor_count_names_expected_and_actual() -> None:
    with pytest.raises(ValueError, match=r"expected \[126, .*got \(125, 8\)"):
        decode_yolox(yolox_pred()[:125], YOLOX_HW, OutputSpec(), THRESHOLD, 100)
    with pytest.raises(ValueError, match=r"expected \[84, "):  # 64x64: 64 + 16 + 4
        decode_yolox(yolox_pred(), (64, 64), OutputSpec(), THRESHOLD, 100)


# --- YOLOv5 and YOLOv8: boxes as cx, cy, w, h in input pixels ----------------------------

def cxcywh(box: tuple[int, int, int, int]) -> list[float]:
    x1, y1, x2, y2 = box
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def yolov5_pred() -> np.ndarray:
    pred = np.zeros((12, 8), dtype=np.float32)  # 12 anchors, 7 of them empty
    for row, (box, classes, obj) in enumerate(SCENE, start=3):
        pred[row] = [*cxcywh(box), obj, *classes]
    return pred


def test_yolov5_scores_objectness_times_class() -> None:
    spec = OutputSpec(decoder="yolov5")
    assert_detections(decode_yolov5(yolov5_pred(), YOLOX_HW, spec, THRESHOLD, 100),
                      CLASS_AWARE)
    spec = OutputSpec(decoder="yolov5", class_agnostic_nms=True)
    assert_detections(decode_yolov5(yolov5_pred(), YOLOX_HW, spec, THRESHOLD, 100),
                      CLASS_AGNOSTIC)


def test_yolov5_accepts_read_only_float16_output() -> None:
    pred = yolov5_pred().astype(np.float16)
    pred.setflags(write=False)  # as some backends return; must not warn (warnings = errors)
    det = decode_yolov5(pred, YOLOX_HW, OutputSpec(decoder="yolov5"), THRESHOLD, 100)
    assert_detections(det, CLASS_AWARE, atol=1e-3)


def yolov8_pred(sigmoid: bool) -> np.ndarray:
    pred = np.zeros((7, 10), dtype=np.float32)  # Ultralytics [4 + C, A], C = 3
    for column, (box, classes, obj) in enumerate(SCENE, start=2):
        pred[:, column] = [*cxcywh(box), *(obj * np.array(classes))]
    if sigmoid:
        pred[4:] = logit(pred[4:])
    return pred


@pytest.mark.parametrize("transpose", [False, True], ids=["4+C,A", "A,4+C"])
@pytest.mark.parametrize("sigmoid", [False, True])
def test_yolov8_both_layouts(transpose: bool, sigmoid: bool) -> None:
    pred = yolov8_pred(sigmoid)
    pred = pred.T if transpose else pred
    spec = OutputSpec(decoder="yolov8", sigmoid=sigmoid)
    assert_detections(decode_yolov8(pred, YOLOX_HW, spec, THRESHOLD, 100, num_classes=3),
                      CLASS_AWARE)


def test_yolov8_shape_not_matching_classes_raises() -> None:
    with pytest.raises(ValueError, match=r"\[8, anchors\].*got \(7, 10\)"):
        decode_yolov8(yolov8_pred(False), YOLOX_HW, OutputSpec(), THRESHOLD, 100,
                      num_classes=4)
    with pytest.raises(ValueError, match="expected 2 dimensions"):
        decode_yolov8(yolov8_pred(False)[None], YOLOX_HW, OutputSpec(), THRESHOLD, 100,
                      num_classes=3)


# --- YOLOv8-seg: 32x48 input, prototypes at stride 4 ([2, 8, 12]) ------------------------

def test_yolov8_seg_masks_are_prototype_rectangle_cropped_to_box() -> None:
    protos = np.full((2, 8, 12), -10.0, dtype=np.float32)
    protos[0, 2:6, 3:9] = 10.0  # the rectangle: input rows 8..23, columns 12..35
    protos[1] = 5.0  # weighted 0 by every detection
    rect = np.zeros((32, 48), dtype=bool)
    rect[8:24, 12:36] = True
    # Bilinear x4 puts each edge exactly on the rectangle's border, but at its 4 corner
    # pixels only 0.625 * 0.625 of the weight falls inside: the logit is negative there.
    rect[[8, 8, 23, 23], [12, 35, 12, 35]] = False
    in_box_1 = np.zeros_like(rect)
    in_box_1[4:28, 20:44] = True  # box (20, 4, 44, 28): x1 <= col < x2, y1 <= row < y2
    in_box_2 = np.zeros_like(rect)
    in_box_2[0:16, 0:16] = True  # box (0, 0, 16, 16)
    pred = np.zeros((4 + 2 + 2, 5), dtype=np.float32)  # [4 + C + M, A], C = 2, M = 2
    pred[:, 1] = [*cxcywh((20, 4, 44, 28)), 0.9, 0.0, 1.0, 0.0]  # class 0, the rectangle
    pred[:, 3] = [*cxcywh((0, 0, 16, 16)), 0.0, 0.8, -1.0, 0.0]  # class 1, its complement
    pred[:, 4] = [*cxcywh((0, 0, 48, 32)), 0.1, 0.0, 1.0, 0.0]  # under the threshold
    for layout in (pred, pred.T):
        det = decode_yolov8_seg(layout, protos, (32, 48), OutputSpec(decoder="yolov8-seg"),
                                THRESHOLD, 100, num_classes=2)
        assert_detections(det, ([(20, 4, 44, 28), (0, 0, 16, 16)], [0.9, 0.8], [0, 1]))
        assert det.masks is not None
        assert det.masks.shape == (2, 32, 48) and det.masks.dtype == np.float32
        assert det.masks.min() >= 0 and det.masks.max() <= 1
        np.testing.assert_array_equal(det.masks[0] > 0.5, in_box_1 & rect)
        np.testing.assert_array_equal(det.masks[1] > 0.5, in_box_2 & ~rect)
        assert (det.masks[0][~in_box_1] == 0).all() and (det.masks[1][~in_box_2] == 0).all()
        assert det.masks[0, 16, 28] > 0.99 and det.masks[1, 4, 4] > 0.99


def test_yolov8_seg_without_detections_has_empty_masks() -> None:
    det = decode_yolov8_seg(np.zeros((8, 5), np.float32), np.zeros((2, 8, 12), np.float32),
                            (32, 48), OutputSpec(), THRESHOLD, 100, num_classes=2)
    assert det.boxes.shape == (0, 4) and det.masks is not None
    assert det.masks.shape == (0, 32, 48)


# --- DETR: 100x200 input -----------------------------------------------------------------

DETR_BOXES = np.array([[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.1, 0.2],
                       [0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1]], dtype=np.float32)
DETR_XYXY = {0: (80, 30, 120, 70), 1: (40, 65, 60, 85)}  # queries 0 and 1 in input px


def test_detr_softmax_drops_no_object_column_and_scales_boxes() -> None:
    probs = np.array([[0.1, 0.7, 0.1, 0.1],  # class 1, 0.7
                      [0.05, 0.05, 0.85, 0.05],  # class 2, 0.85
                      [0.12, 0.1, 0.08, 0.7],  # no-object wins: best class only 0.12
                      [0.4, 0.2, 0.2, 0.2]],  # class 0, 0.4: under the threshold
                     dtype=np.float32)
    spec = OutputSpec(decoder="detr", activation="softmax")
    det = decode_detr(np.log(probs), DETR_BOXES, (100, 200), spec, 0.5, 100)
    assert_detections(det, ([DETR_XYXY[1], DETR_XYXY[0]], [0.85, 0.7], [2, 1]))
    det = decode_detr(np.log(probs), DETR_BOXES, (100, 200), spec, 0.05, 100)
    assert det.class_ids.tolist() == [2, 1, 0, 0]  # no-object query scored by its best class
    np.testing.assert_allclose(det.scores, [0.85, 0.7, 0.4, 0.12], atol=1e-5)


def test_detr_sigmoid_per_class_without_no_object_column() -> None:
    probs = np.array([[0.9, 0.2], [0.3, 0.6], [0.1, 0.1], [0.2, 0.4]], dtype=np.float32)
    spec = OutputSpec(decoder="detr", activation="sigmoid")
    det = decode_detr(logit(probs), DETR_BOXES, (100, 200), spec, 0.5, 100)
    assert_detections(det, ([DETR_XYXY[0], DETR_XYXY[1]], [0.9, 0.6], [0, 1]))
    det = decode_detr(logit(probs), DETR_BOXES, (100, 200), spec, 0.5, 1)
    assert_detections(det, ([DETR_XYXY[0]], [0.9], [0]))


def test_detr_box_count_must_match_queries() -> None:
    with pytest.raises(ValueError, match=r"expected \[4, 4\].*got \(3, 4\)"):
        decode_detr(np.zeros((4, 3), np.float32), DETR_BOXES[:3], (100, 200), OutputSpec(),
                    0.5, 100)


# --- Semantic segmentation and classification --------------------------------------------

def same_size(hw: tuple[int, int]) -> Geometry:
    return Geometry(hw, hw, (1.0, 1.0), (0.0, 0.0))


def test_semantic_label_map_is_the_argmax_at_the_same_size() -> None:
    logits = np.random.default_rng(0).normal(size=(5, 6, 8)).astype(np.float32)  # [C, h, w]
    labels = label_map_at_original(torch.from_numpy(logits), same_size((6, 8)))
    assert labels.dtype == np.uint8 and labels.shape == (6, 8)
    np.testing.assert_array_equal(labels, logits.argmax(axis=0))


def test_semantic_upsamples_half_size_logits_to_input() -> None:
    # Class 1 wins where (row < 2) == (col < 3) on the 4x6 map; bilinear x2 moves each
    # boundary to the matching place on the 8x12 input: (row < 4) == (col < 6).
    sign = np.where(np.arange(4)[:, None] < 2, 1.0, -1.0) * np.where(np.arange(6) < 3, 1, -1)
    logits = np.stack([-sign, sign]).astype(np.float32)  # [2, 4, 6]
    labels = label_map_at_original(torch.from_numpy(logits), same_size((8, 12)))
    expected = (np.arange(8)[:, None] < 4) == (np.arange(12) < 6)
    np.testing.assert_array_equal(labels, expected.astype(np.uint8))


def test_semantic_label_map_equals_one_interpolate_to_the_original(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A `shorter` resize of a 61x83 photo to a 30x40 input (whose logits are 15x20): the
    served map equals F.interpolate of the logits straight to 61x83 (noise logits: most
    pixels are boundary pixels, interpolated chunk by chunk)."""
    from cvserve.worker import segmentation
    from cvserve.worker.preprocess import fit
    from cvserve.worker.repository import InputSpec

    monkeypatch.setattr(segmentation, "CHUNK_PIXELS", 97)  # boundary pixels in many chunks
    _, geometry = fit((61, 83), InputSpec(resize="shorter", resize_shorter=30))
    assert geometry.input_hw == (30, 40)  # torchvision's Resize(30): 83 * 30 / 61 truncated
    logits = torch.randn(5, 15, 20, generator=torch.Generator().manual_seed(1))
    want = F.interpolate(logits[None], size=(61, 83), mode="bilinear",
                         align_corners=False)[0].argmax(0).numpy()
    got = label_map_at_original(logits, geometry)
    assert got.shape == (61, 83)
    assert (got == want).mean() >= 0.999  # float rounding may flip a near tie
    smooth = F.interpolate(logits[None], scale_factor=4, mode="bilinear")[0]  # 60x80
    want = F.interpolate(smooth[None], size=(61, 83), mode="bilinear",
                         align_corners=False)[0].argmax(0).numpy()
    _, geometry = fit((61, 83), InputSpec(resize="shorter", resize_shorter=60))
    assert (label_map_at_original(smooth, geometry) == want).mean() >= 0.999


def test_classify_softmax_top_k_best_first() -> None:
    logits = np.array([0.5, 2.0, -1.0, 1.0], dtype=np.float32)
    probs = np.exp(logits) / np.exp(logits).sum()
    class_ids, scores = classify(logits, OutputSpec(activation="softmax"), top_k=3)
    assert class_ids.dtype == np.int64 and scores.dtype == np.float32
    assert class_ids.tolist() == [1, 3, 0]
    np.testing.assert_allclose(scores, probs[[1, 3, 0]], rtol=1e-5)
    class_ids, scores = classify(logits[None], OutputSpec(activation="softmax"), top_k=10)
    assert class_ids.tolist() == [1, 3, 0, 2]
    assert scores.sum() == pytest.approx(1.0, abs=1e-6)


def test_classify_sigmoid_and_none() -> None:
    logits = np.array([0.5, 2.0, -1.0, 1.0], dtype=np.float32)
    class_ids, scores = classify(logits, OutputSpec(activation="sigmoid"), top_k=2)
    assert class_ids.tolist() == [1, 3]
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits[[1, 3]])), rtol=1e-5)
    class_ids, scores = classify(logits, OutputSpec(activation="none"), top_k=2)
    assert class_ids.tolist() == [1, 3] and scores.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match=r"got \(2, 4\)"):
        classify(np.zeros((2, 4), np.float32), OutputSpec(), top_k=1)

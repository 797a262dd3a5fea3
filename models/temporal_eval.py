"""Temporal detection mAP, as ActivityNet and THUMOS'14 score action localization.

Follows ActivityNet's Evaluation/eval_detection.py (`compute_average_precision_detection`)
and Evaluation/utils.py (`interpolated_prec_rec`, `segment_iou`), github.com/activitynet/
ActivityNet, read and re-implemented here:

- per class, predictions are taken by score, highest first; each is a true positive when
  its video holds a ground truth segment of that class, not yet matched at this tIoU
  threshold, with tIoU >= threshold (the one of highest tIoU among those); otherwise a
  false positive. Each threshold matches independently.
- precision = TP / (TP + FP) and recall = TP / (number of ground truth segments of the
  class) after each prediction; AP is the area under the precision envelope (precision made
  monotone from the right), summed where recall changes: VOC 2010+ all-point interpolation.
- mAP at a threshold averages AP over the classes that have ground truth (a class without
  predictions scores 0); predictions of classes without ground truth are ignored (the
  reference rejects them). THUMOS'14 reports mAP at tIoU 0.3..0.7, ActivityNet the mean over
  0.5:0.95; TIOU_THRESHOLDS here are 0.3, 0.5, 0.7 and their mean.

One deliberate difference: equal scores keep input order (a stable sort) where the
reference's argsort()[::-1] reverses it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from cvserve.worker.localization import temporal_iou

TIOU_THRESHOLDS = (0.3, 0.5, 0.7)


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """All-point interpolated AP of a precision/recall curve # [N] each (recall ascending)."""
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(mprec[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * envelope[steps]))


def _segments(rows: Sequence[dict], what: str, scored: bool) -> None:
    for i, row in enumerate(rows):
        keys = ("video_id", "label", "start_s", "end_s") + (("score",) if scored else ())
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{what}[{i}] lacks {missing}; expected keys {list(keys)}")
        if not row["end_s"] >= row["start_s"]:
            raise ValueError(f"{what}[{i}] ends before it starts: start_s={row['start_s']}, "
                             f"end_s={row['end_s']}")


def average_precision(ground_truth: Sequence[dict], predictions: Sequence[dict],
                      tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS) -> np.ndarray:
    """AP of one class's predictions against its ground truth, per threshold -> # [T].

    Rows are dicts {video_id, start_s, end_s[, score]}; any label they carry is not read.
    """
    thresholds = np.asarray(tiou_thresholds, dtype=np.float64)
    ap = np.zeros(len(thresholds))
    if not ground_truth or not predictions:
        return ap
    truth_by_video: dict[object, list[int]] = defaultdict(list)
    for j, row in enumerate(ground_truth):
        truth_by_video[row["video_id"]].append(j)
    truth = np.array([(r["start_s"], r["end_s"]) for r in ground_truth], dtype=np.float64)
    order = np.argsort([-float(p["score"]) for p in predictions], kind="stable")
    matched = np.zeros((len(thresholds), len(ground_truth)), dtype=bool)
    tp = np.zeros((len(thresholds), len(order)))
    for rank, i in enumerate(order):
        pred = predictions[i]
        candidates = np.asarray(truth_by_video.get(pred["video_id"], []), dtype=np.intp)
        if not len(candidates):
            continue
        tiou = temporal_iou([[pred["start_s"], pred["end_s"]]], truth[candidates])[0]
        for t, threshold in enumerate(thresholds):
            # The unmatched ground truth of highest tIoU, if it clears the threshold.
            free = np.where(matched[t, candidates], -1.0, tiou)
            best = int(free.argmax())
            if free[best] >= threshold:
                matched[t, candidates[best]] = True
                tp[t, rank] = 1.0
    tp_cum = np.cumsum(tp, axis=1)
    fp_cum = np.cumsum(1.0 - tp, axis=1)
    recall = tp_cum / len(ground_truth)
    precision = tp_cum / (tp_cum + fp_cum)
    for t in range(len(thresholds)):
        ap[t] = interpolated_ap(precision[t], recall[t])
    return ap


def temporal_map(ground_truth: Sequence[dict], predictions: Sequence[dict],
                 tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS) -> dict[str, float]:
    """mAP over classes with ground truth at each tIoU threshold, and their mean.

    ground_truth: dicts {video_id, label, start_s, end_s}; predictions: the same with score.
    Returns {"map@0.3": ..., "map@0.5": ..., "map@0.7": ..., "average_map": ...}; all 0.0
    when there is no ground truth.
    """
    _segments(ground_truth, "ground_truth", scored=False)
    _segments(predictions, "predictions", scored=True)
    truth_by_label: dict[str, list[dict]] = defaultdict(list)
    preds_by_label: dict[str, list[dict]] = defaultdict(list)
    for row in ground_truth:
        truth_by_label[row["label"]].append(row)
    for row in predictions:
        preds_by_label[row["label"]].append(row)
    if truth_by_label:
        ap = np.stack([average_precision(rows, preds_by_label.get(label, []), tiou_thresholds)
                       for label, rows in truth_by_label.items()])  # [C, T]
        per_threshold = ap.mean(axis=0)
    else:
        per_threshold = np.zeros(len(tiou_thresholds))
    result = {f"map@{t:g}": float(m) for t, m in zip(tiou_thresholds, per_threshold,
                                                     strict=True)}
    result["average_map"] = float(per_threshold.mean())
    return result

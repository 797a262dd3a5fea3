"""Temporal action localization for /classify-video?localize=true: window scores to segments.

A video classifier scores dense sliding windows (window i covers [starts_s[i], starts_s[i] +
clip_s) seconds) with class probabilities # [W, K]. `localize` turns them into labelled
segments in five stages (docs/localization.md):

1. Score curves. At time t, class k scores c_k(t) = mean of p[i, k] over the windows i that
   cover t. The curve only changes at window boundaries, so it is held exactly on the
   elementary intervals between them: there is no grid resolution to choose.
2. Proposals: temporal actionness grouping (TAG; Zhao et al. 2017, "Temporal Action Detection
   with Structured Segment Networks"). For each class and each threshold in
   `grouping_thresholds`, every maximal run of time with c_k(t) >= threshold is a proposal.
3. Boundary refinement. Overlapping windows blur an action's step into a ramp about
   2 * clip_s wide centred on the true boundary, so a fixed threshold cuts too wide or too
   narrow. Each boundary moves to the nearest point where c_k crosses the half level
   (inside + outside) / 2 (outside: both margins of stage 4 together), which is where a
   least-squares two-level step fit puts it; nested proposals of one action converge to
   the same segment.
4. Scores: outer-inner contrast (after AutoLoc's OIC, Shou et al. 2018),
   score = mean of c_k over [a, b] - max(mean over [a - m, a], mean over [b, b + m]),
   m = OUTER_RATIO * (b - a), margins clipped to the video (a side with no margin left
   counts as 0). A segment that stands out from both sides scores high; a fragment of a
   longer action (the action continues on one side) and a bump of noise score low.
   Segments shorter than the window stride are dropped: windows cannot resolve them.
5. Segments scoring >= score_threshold go through greedy temporal NMS per class at
   `nms_iou`; the best `max_segments` of all classes are the answer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from cvserve.app.errors import BackendError, InputError

# TAG thresholds: SSN sweeps 0.05..0.95; steps of 0.1 give the same boundaries to within the
# blur of overlapping windows at half the proposals.
GROUPING_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Each side margin for the outside mean, as a fraction of the proposal's length (AutoLoc: 0.25).
OUTER_RATIO = 0.25
# Rounds of half-level boundary refinement (each re-measures inside and outside means).
REFINE_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Segment:
    """One localized action: [start_s, end_s] seconds from the start of the video."""

    label: str
    class_id: int
    start_s: float
    end_s: float
    score: float


def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1-D IoU of intervals a # [N, 2] and b # [M, 2] (start, end) -> # [N, M].

    Two empty intervals (zero union) have IoU 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    inter = np.clip(np.minimum(a[:, None, 1], b[None, :, 1])
                    - np.maximum(a[:, None, 0], b[None, :, 0]), 0.0, None)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms_indices(intervals: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy 1-D NMS: indices into intervals # [N, 2] that survive, by score descending.

    An interval is dropped when its IoU with a kept, higher-scoring one exceeds `iou`, or
    when two or more kept, higher-scoring ones jointly cover more than `iou` of its
    length: a span over two actions of one class (and the idle gap between them) overlaps
    each by less than half, so IoU alone keeps it beside them. Ties keep the earlier index.
    """
    intervals = np.asarray(intervals, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ious = temporal_iou(intervals, intervals)
    suppressed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for i in order:
        if suppressed[i] or _covered(intervals[i], intervals[keep]) > iou:
            continue
        keep.append(i)
        suppressed |= ious[i] > iou
    return np.asarray(keep, dtype=np.intp)


def _covered(interval: np.ndarray, others: np.ndarray) -> float:
    """Share of `interval` # [2] that the union of `others` # [M, 2] covers, when at least
    two of them overlap it (else 0: one overlap is plain NMS's business)."""
    length = interval[1] - interval[0]
    overlapping = others[(others[:, 1] > interval[0]) & (others[:, 0] < interval[1])] \
        if len(others) else others
    if length <= 0 or len(overlapping) < 2:
        return 0.0
    clipped = np.clip(overlapping, interval[0], interval[1])
    clipped = clipped[np.argsort(clipped[:, 0], kind="stable")]
    covered, reach = 0.0, interval[0]
    for start, end in clipped:
        start = max(start, reach)
        if end > start:
            covered += end - start
            reach = end
    return covered / length


def temporal_nms(segments: Sequence[Segment], iou: float) -> list[Segment]:
    """Greedy NMS within each class; the survivors of all classes, by score descending."""
    kept: list[Segment] = []
    for class_id in sorted({s.class_id for s in segments}):
        same = [s for s in segments if s.class_id == class_id]
        intervals = np.array([(s.start_s, s.end_s) for s in same], dtype=np.float64)
        scores = np.array([s.score for s in same], dtype=np.float64)
        kept.extend(same[i] for i in nms_indices(intervals, scores, iou))
    return sorted(kept, key=lambda s: (-s.score, s.start_s, s.class_id))


def score_curves(starts_s: np.ndarray, clip_s: float, probs: np.ndarray,
                 duration_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-class scores over time: edges # [J + 1] s and curves # [J, K].

    curves[j] is the mean of the rows of probs # [W, K] whose windows cover the interval
    [edges[j], edges[j + 1]) of [0, duration_s]. An interval no window covers (the tail
    after the last window, gaps when the stride exceeds the clip) takes the nearest window.
    """
    starts = np.asarray(starts_s, dtype=np.float64)
    ends = starts + clip_s
    edges = np.unique(np.clip(np.concatenate([[0.0, duration_s], starts, ends]),
                              0.0, duration_s))
    mids = (edges[:-1] + edges[1:]) / 2  # [J]
    cover = (starts[None, :] <= mids[:, None]) & (mids[:, None] < ends[None, :])  # [J, W]
    uncovered = ~cover.any(axis=1)
    if uncovered.any():
        gap = np.maximum(np.maximum(starts[None, :] - mids[uncovered, None],
                                    mids[uncovered, None] - ends[None, :]), 0.0)
        cover[np.flatnonzero(uncovered), gap.argmin(axis=1)] = True
    weights = cover / cover.sum(axis=1, keepdims=True)
    return edges, weights @ np.asarray(probs, dtype=np.float64)


def _runs(mask: np.ndarray) -> np.ndarray:
    """Maximal runs of True in mask # [J] as half-open index ranges # [R, 2]."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    change = np.flatnonzero(np.diff(padded))
    return change.reshape(-1, 2)


def _proposals(edges: np.ndarray, curve: np.ndarray,
               thresholds: Sequence[float]) -> np.ndarray:
    """TAG proposals of one class's curve # [J]: distinct (start_s, end_s) # [P, 2]."""
    ranges = [_runs(curve >= t) for t in thresholds if curve.max() >= t]
    if not ranges:
        return np.empty((0, 2))
    index = np.unique(np.concatenate(ranges), axis=0)
    return np.stack([edges[index[:, 0]], edges[index[:, 1]]], axis=1)


def _area(edges: np.ndarray, curve: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integral of the piecewise constant curve # [J] over [lo, hi] (arrays of seconds)."""
    # The integral of a piecewise constant curve is piecewise linear: exact by interpolation.
    integral = np.concatenate([[0.0], np.cumsum(curve * np.diff(edges))])
    return np.interp(hi, edges, integral) - np.interp(lo, edges, integral)


def _inside_outside(edges: np.ndarray, curve: np.ndarray, proposals: np.ndarray,
                    duration_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve inside proposals # [P, 2], over both OUTER_RATIO margins together, and in
    the higher of the two -> 3 x # [P]. A margin cut off by the video's ends counts as 0."""
    a, b = proposals[:, 0], proposals[:, 1]
    length = b - a
    inside = _area(edges, curve, a, b) / length
    areas, widths = [], []
    for lo, hi in ((np.maximum(a - OUTER_RATIO * length, 0.0), a),
                   (b, np.minimum(b + OUTER_RATIO * length, duration_s))):
        areas.append(_area(edges, curve, lo, hi))
        widths.append(hi - lo)

    def mean(area: np.ndarray, width: np.ndarray) -> np.ndarray:
        return np.where(width > 0, area / np.where(width > 0, width, 1.0), 0.0)

    both = mean(areas[0] + areas[1], widths[0] + widths[1])
    return inside, both, np.maximum(mean(areas[0], widths[0]), mean(areas[1], widths[1]))


def _crossings(x: np.ndarray, y: np.ndarray, level: float, rising: bool) -> np.ndarray:
    """Times where the linear interpolation of (x, y) crosses `level` upward (or downward)."""
    below = y < level
    j = np.flatnonzero(below[:-1] & ~below[1:] if rising else ~below[:-1] & below[1:])
    return x[j] + (level - y[j]) / (y[j + 1] - y[j]) * (x[j + 1] - x[j])


def _refine(edges: np.ndarray, curve: np.ndarray, proposals: np.ndarray,
            duration_s: float) -> np.ndarray:
    """Move each boundary of proposals # [P, 2] to the nearest crossing of the half level.

    Overlapping windows blur a step into a ramp centred on the true boundary, so the
    least-squares two-level fit puts the boundary where the curve crosses (inside +
    outside) / 2. The curve is read as linear between interval midpoints (sub-stride
    boundaries); the start of the video counts as a rising crossing when the curve starts
    above the level, and its end as a falling one. REFINE_STEPS rounds re-measure the levels.
    """
    x = (edges[:-1] + edges[1:]) / 2
    refined = proposals.copy()
    for _ in range(REFINE_STEPS):
        inside, outside, _ = _inside_outside(edges, curve, refined, duration_s)
        for p, level in enumerate((inside + outside) / 2):
            a, b = refined[p]
            rises = _crossings(x, curve, level, rising=True)
            falls = _crossings(x, curve, level, rising=False)
            if curve[0] >= level:
                rises = np.append(rises, 0.0)
            if curve[-1] >= level:
                falls = np.append(falls, duration_s)
            rises, falls = rises[rises < b], falls[falls > a]
            new_a = rises[np.abs(rises - a).argmin()] if len(rises) else a
            falls = falls[falls > new_a]
            new_b = falls[np.abs(falls - b).argmin()] if len(falls) else b
            refined[p] = (new_a, new_b)
    return refined


def _check_parameters(score_threshold: float, nms_iou: float, max_segments: int,
                      grouping_thresholds: Sequence[float]) -> None:
    if not (math.isfinite(score_threshold) and 0.0 <= score_threshold <= 1.0):
        raise InputError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if not (math.isfinite(nms_iou) and 0.0 < nms_iou <= 1.0):
        raise InputError(f"nms_iou must be in (0, 1], got {nms_iou}")
    if isinstance(max_segments, bool) or not isinstance(max_segments, int) or max_segments < 1:
        raise InputError(f"max_segments must be a positive integer, got {max_segments}")
    if not grouping_thresholds or not all(0.0 < t <= 1.0 for t in grouping_thresholds):
        raise InputError(f"grouping_thresholds must be a non-empty list of numbers in (0, 1], "
                         f"got {list(grouping_thresholds)}")


def _check_arrays(starts: np.ndarray, clip_s: float, probs: np.ndarray, labels: Sequence[str],
                  duration_s: float, background: int | None) -> None:
    """The model's output against what the clip plan promised; a mismatch is a server bug."""
    if starts.ndim != 1:
        raise BackendError(f"window starts must have shape [W], got {list(starts.shape)}")
    if probs.shape != (len(starts), len(labels)):
        raise BackendError(f"window probabilities must have shape [W, K] = "
                           f"[{len(starts)}, {len(labels)}] (W windows, K labels), "
                           f"got {list(probs.shape)}")
    if not np.isfinite(starts).all():
        raise BackendError("window starts must be finite seconds")
    if probs.size and not (np.isfinite(probs).all() and probs.min() >= 0.0
                           and probs.max() <= 1.0 + 1e-6):
        raise BackendError(f"window probabilities must lie in [0, 1], got values in "
                           f"[{np.nanmin(probs):g}, {np.nanmax(probs):g}]")
    if not (math.isfinite(clip_s) and clip_s > 0):
        raise BackendError(f"clip_s must be a positive number of seconds, got {clip_s}")
    if not (math.isfinite(duration_s) and duration_s >= 0):
        raise BackendError(f"duration_s must be a non-negative number of seconds, "
                           f"got {duration_s}")
    if background is not None and not 0 <= background < len(labels):
        raise BackendError(f"background class must be an index in [0, {len(labels)}), "
                           f"got {background}")


def localize(starts_s: np.ndarray, clip_s: float, probs: np.ndarray, labels: Sequence[str],
             duration_s: float, *, background: int | None, score_threshold: float = 0.25,
             nms_iou: float = 0.5, max_segments: int = 100,
             grouping_thresholds: Sequence[float] = GROUPING_THRESHOLDS) -> list[Segment]:
    """Action segments in a video from its sliding-window class probabilities.

    starts_s # [W] window starts, s; each window lasts clip_s s. probs # [W, K], one row
    per window (softmax or per-class sigmoid), K == len(labels). `background` is the index
    of the no-action class, never reported (None: every class is an action). Segments lie
    in [0, duration_s], score (outer-inner contrast, in [-1, 1]) >= score_threshold, survive
    per-class NMS at nms_iou, sorted by score descending, at most max_segments.
    No windows, or a video of zero length, give no segments.

    Defaults: a clear action scores 0.4-0.8 (less when clip_s nears its length, as the
    blur eats into it), noise and cut-off fragments below 0.2; 0.25 sits between. NMS at
    IoU 0.5 is the usual setting in temporal detection (SSN, BSN).
    """
    starts = np.asarray(starts_s, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    _check_parameters(score_threshold, nms_iou, max_segments, grouping_thresholds)
    _check_arrays(starts, clip_s, probs, labels, duration_s, background)
    if len(starts) == 0 or duration_s == 0:
        return []
    edges, curves = score_curves(starts, clip_s, probs, duration_s)
    # Windows cannot place a boundary finer than their stride: shorter segments are artefacts.
    distinct = np.unique(starts)
    stride_s = float(np.median(np.diff(distinct))) if len(distinct) > 1 else clip_s
    min_length_s = min(stride_s, clip_s, duration_s)
    segments: list[Segment] = []
    for k, label in enumerate(labels):
        if k == background:
            continue
        proposals = _proposals(edges, curves[:, k], grouping_thresholds)
        if not len(proposals):
            continue
        proposals = np.unique(_refine(edges, curves[:, k], proposals, duration_s), axis=0)
        proposals = proposals[proposals[:, 1] - proposals[:, 0] >= min_length_s]
        inside, _, outside = _inside_outside(edges, curves[:, k], proposals, duration_s)
        scores = inside - outside
        passing = scores >= score_threshold
        proposals, scores = proposals[passing], scores[passing]
        for i in nms_indices(proposals, scores, nms_iou):
            segments.append(Segment(label=label, class_id=k, start_s=float(proposals[i, 0]),
                                    end_s=float(proposals[i, 1]), score=float(scores[i])))
    segments.sort(key=lambda s: (-s.score, s.start_s, s.class_id))
    return segments[:max_segments]

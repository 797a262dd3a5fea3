"""worker/localization.py (segments from sliding-window scores) and models/temporal_eval.py."""

from __future__ import annotations

import numpy as np
import pytest

from cvserve.app.errors import BackendError, InputError
from cvserve.models.temporal_eval import average_precision, interpolated_ap, temporal_map
from cvserve.worker.localization import Segment, localize, temporal_iou, temporal_nms
from cvserve.worker.video import VideoInfo, clip_starts

LABELS = ["none", "jump", "run", "wave"]  # class 0 is the background
TRUTH = [(3.0, 9.0, 1), (12.0, 16.5, 2), (20.0, 28.0, 3), (31.0, 35.0, 1), (37.5, 40.0, 2)]


def window_starts(duration_s: float, clip_s: float, stride_s: float) -> np.ndarray:
    """Window starts as /classify-video plans them (clip_len 16 frames at 16 / clip_s fps)."""
    info = VideoInfo(duration_s=duration_s, fps=25.0, width=64, height=48, rotation=0,
                     codec="h264", frames=None)
    return np.array(clip_starts(info, 16, 16 / clip_s, clip_stride_s=stride_s))


def window_probs(starts: np.ndarray, clip_s: float, truth: list[tuple[float, float, int]],
                 noise: float, rng: np.random.Generator) -> np.ndarray:
    """A classifier that sees class k in the fraction of the clip k covers # [W, K] softmax.

    The rest of the clip is background; uniform noise in [0, noise) on every class, then
    renormalized.
    """
    probs = np.zeros((len(starts), len(LABELS)))
    for start_s, end_s, k in truth:
        overlap = np.minimum(starts + clip_s, end_s) - np.maximum(starts, start_s)
        probs[:, k] += np.clip(overlap, 0.0, None) / clip_s
    probs[:, 0] = np.clip(1.0 - probs[:, 1:].sum(axis=1), 0.0, None)
    probs += rng.uniform(0.0, noise, probs.shape)
    return probs / probs.sum(axis=1, keepdims=True)


# --- temporal IoU and NMS ---------------------------------------------------------------

def test_temporal_iou_by_hand() -> None:
    a = np.array([[0.0, 10.0]])
    b = np.array([[5.0, 15.0], [0.0, 10.0], [2.0, 4.0], [10.0, 12.0], [20.0, 30.0]])
    # [5, 15]: 5 shared of 15 covered; [2, 4] inside: 2 of 10; touching or apart: 0.
    np.testing.assert_allclose(temporal_iou(a, b), [[1 / 3, 1.0, 0.2, 0.0, 0.0]])
    assert temporal_iou(b, a).shape == (5, 1)
    assert temporal_iou([[3.0, 3.0]], [[3.0, 3.0]])[0, 0] == 0.0  # empty: no union, IoU 0


def test_nms_suppresses_overlaps_of_a_class_and_keeps_other_classes() -> None:
    segments = [
        Segment("jump", 1, 0.0, 10.0, 0.9),
        Segment("jump", 1, 1.0, 11.0, 0.8),   # IoU 9/11 with the first: suppressed
        Segment("jump", 1, 8.0, 20.0, 0.7),   # IoU 2/20 with the first: kept
        Segment("run", 2, 1.0, 11.0, 0.6),    # same span, other class: kept
    ]
    kept = temporal_nms(segments, iou=0.5)
    assert kept == [segments[0], segments[2], segments[3]]
    assert temporal_nms(segments, iou=0.85) == [segments[0], segments[1], segments[2],
                                                segments[3]]
    assert temporal_nms([], iou=0.5) == []


def test_nms_drops_a_span_over_two_actions_of_one_class() -> None:
    """Seen on a synthetic video: rotate 1.0-4.5 s and 6.3-9.8 s, and a weaker proposal
    spanning both (and the idle gap); it overlaps each by less than half."""
    segments = [
        Segment("rotate", 5, 6.3, 9.8, 0.60),
        Segment("rotate", 5, 1.0, 4.5, 0.53),
        Segment("rotate", 5, 0.8, 10.0, 0.51),  # IoU 0.38 / 0.38; 76 % covered by both
        Segment("rotate", 5, 11.0, 14.0, 0.40),  # a third action, apart: kept
    ]
    assert temporal_nms(segments, iou=0.5) == [segments[0], segments[1], segments[3]]


# --- AP and mAP ---------------------------------------------------------------------------

def gt(video: str, label: str, start_s: float, end_s: float) -> dict:
    return {"video_id": video, "label": label, "start_s": start_s, "end_s": end_s}


def pred(video: str, label: str, start_s: float, end_s: float, score: float) -> dict:
    return {**gt(video, label, start_s, end_s), "score": score}


def test_ap_of_a_false_positive_ranked_above_a_true_positive() -> None:
    truth = [gt("v", "jump", 10.0, 20.0)]
    # Ranked: [30, 40] (tIoU 0: FP), then [11, 20] (tIoU 0.9: TP).
    # precision 0, 1/2; recall 0, 1. Envelope at recall 1 is 1/2: AP = 1 * 1/2.
    preds = [pred("v", "jump", 30.0, 40.0, 0.9), pred("v", "jump", 11.0, 20.0, 0.8)]
    assert average_precision(truth, preds, [0.5]) == pytest.approx([0.5])
    # The other order: precision 1, 1/2 at recall 1, 1: AP = 1.
    preds[0]["score"] = 0.7
    assert average_precision(truth, preds, [0.5]) == pytest.approx([1.0])


def test_ap_by_hand_with_a_duplicate_and_a_miss() -> None:
    truth = [gt("v", "jump", 0.0, 10.0), gt("v", "jump", 20.0, 30.0)]
    preds = [pred("v", "jump", 0.0, 10.0, 0.9),    # TP
             pred("v", "jump", 1.0, 10.0, 0.8),    # tIoU 0.9, but [0, 10] is taken: FP
             pred("v", "jump", 22.0, 30.0, 0.7),   # tIoU 0.8: TP
             pred("w", "jump", 0.0, 10.0, 0.6)]    # another video: FP
    # precision 1, 1/2, 2/3, 1/2; recall 1/2, 1/2, 1, 1.
    # Envelope: 1 at recall 1/2, 2/3 at recall 1: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # At tIoU 0.85 the third is an FP too: AP = 1/2 * 1 = 1/2.
    assert average_precision(truth, preds, [0.5, 0.85]) == pytest.approx([5 / 6, 1 / 2])


def test_interpolated_ap_takes_the_precision_envelope() -> None:
    # Precision 1/2 at recall 1/2 rises to 2/3 at recall 1: the envelope lifts it.
    assert interpolated_ap(np.array([0.5, 2 / 3]), np.array([0.5, 1.0])) == pytest.approx(2 / 3)
    assert interpolated_ap(np.array([]), np.array([])) == 0.0


def test_map_is_one_for_predictions_equal_to_the_truth() -> None:
    truth = [gt("a", "jump", 1.0, 4.0), gt("a", "run", 5.0, 9.0), gt("b", "jump", 0.0, 2.5),
             gt("b", "wave", 3.0, 7.0)]
    preds = [{**row, "score": 0.5} for row in truth]
    assert temporal_map(truth, preds) == {"map@0.3": 1.0, "map@0.5": 1.0, "map@0.7": 1.0,
                                          "average_map": 1.0}


def test_map_falls_when_a_boundary_moves() -> None:
    truth = [gt("a", "jump", 0.0, 10.0), gt("a", "run", 20.0, 30.0)]
    preds = [pred("a", "jump", 0.0, 6.0, 0.9),  # tIoU 0.6: a hit at 0.3 and 0.5, not at 0.7
             pred("a", "run", 20.0, 30.0, 0.9)]
    result = temporal_map(truth, preds)
    assert result == pytest.approx({"map@0.3": 1.0, "map@0.5": 1.0, "map@0.7": 0.5,
                                    "average_map": 2.5 / 3})


def test_map_is_zero_for_wrong_labels_and_ignores_classes_without_truth() -> None:
    truth = [gt("a", "jump", 0.0, 10.0), gt("a", "run", 20.0, 30.0)]
    swapped = [pred("a", "run", 0.0, 10.0, 0.9), pred("a", "jump", 20.0, 30.0, 0.9),
               pred("a", "wave", 0.0, 10.0, 0.9)]
    assert temporal_map(truth, swapped)["average_map"] == 0.0
    # jump found, run not predicted at all: (1 + 0) / 2 per threshold; "wave" has no truth.
    assert temporal_map(truth, [pred("a", "jump", 0.0, 10.0, 0.9),
                                pred("a", "wave", 20.0, 30.0, 0.9)])["average_map"] == 0.5


def test_map_rejects_malformed_rows() -> None:
    with pytest.raises(ValueError, match=r"predictions\[0\] lacks \['score'\]"):
        temporal_map([gt("a", "jump", 0.0, 1.0)], [gt("a", "jump", 0.0, 1.0)])
    with pytest.raises(ValueError, match="ends before it starts"):
        temporal_map([gt("a", "jump", 2.0, 1.0)], [])


# --- localize -----------------------------------------------------------------------------

@pytest.mark.parametrize(("clip_s", "stride_s"), [(2.0, 0.5), (1.0, 0.25)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_localize_recovers_segments_from_noisy_overlapping_windows(
        clip_s: float, stride_s: float, seed: int) -> None:
    starts = window_starts(40.0, clip_s, stride_s)
    probs = window_probs(starts, clip_s, TRUTH, noise=0.2, rng=np.random.default_rng(seed))
    segments = localize(starts, clip_s, probs, LABELS, 40.0, background=0)

    assert len(segments) == len(TRUTH)
    scores = [s.score for s in segments]
    assert scores == sorted(scores, reverse=True)
    for start_s, end_s, k in TRUTH:
        same_class = [s for s in segments if s.class_id == k]
        best = max(same_class, key=lambda s: temporal_iou([[s.start_s, s.end_s]],
                                                          [[start_s, end_s]])[0, 0])
        assert temporal_iou([[best.start_s, best.end_s]], [[start_s, end_s]])[0, 0] >= 0.7
        assert best.label == LABELS[k]
    assert all(0.0 <= s.start_s < s.end_s <= 40.0 for s in segments)


def test_localized_segments_score_full_map() -> None:
    starts = window_starts(40.0, 2.0, 0.5)
    probs = window_probs(starts, 2.0, TRUTH, noise=0.2, rng=np.random.default_rng(3))
    segments = localize(starts, 2.0, probs, LABELS, 40.0, background=0)
    preds = [pred("v", s.label, s.start_s, s.end_s, s.score) for s in segments]
    truth = [gt("v", LABELS[k], a, b) for a, b, k in TRUTH]
    assert temporal_map(truth, preds)["map@0.7"] == 1.0


def test_all_background_gives_no_segments() -> None:
    starts = window_starts(30.0, 2.0, 0.5)
    probs = window_probs(starts, 2.0, [], noise=0.3, rng=np.random.default_rng(0))
    assert localize(starts, 2.0, probs, LABELS, 30.0, background=0) == []


def test_a_video_shorter_than_one_clip_is_one_window() -> None:
    starts = window_starts(1.2, 2.0, 0.5)
    assert starts.tolist() == [0.0]
    running = np.array([[0.1, 0.05, 0.8, 0.05]])
    [segment] = localize(starts, 2.0, running, LABELS, 1.2, background=0)
    # No margin outside [0, 1.2] to compare with: the score is the inside mean.
    assert segment == Segment("run", 2, 0.0, 1.2, pytest.approx(0.8))
    idle = np.array([[0.9, 0.05, 0.03, 0.02]])
    assert localize(starts, 2.0, idle, LABELS, 1.2, background=0) == []


def test_no_windows_give_no_segments() -> None:
    assert localize(np.zeros(0), 2.0, np.zeros((0, 4)), LABELS, 10.0, background=0) == []
    assert localize(np.zeros(1), 2.0, np.full((1, 4), 0.25), LABELS, 0.0, background=0) == []


def test_without_a_background_class_every_class_is_an_action() -> None:
    # Windows at 0, 1, ..., 8 of 2 s over 10 s: "jump" then "run" from 5 s; the boundary
    # to within a tenth of a clip.
    starts = np.arange(9.0)
    probs = np.zeros((9, 2))
    for i, start in enumerate(starts):
        run = np.clip(start + 2.0 - 5.0, 0.0, 2.0) / 2.0
        probs[i] = (1.0 - run, run)
    segments = localize(starts, 2.0, probs, ["jump", "run"], 10.0, background=None)
    assert [(s.label, s.start_s, s.end_s) for s in sorted(segments, key=lambda s: s.start_s)] \
        == [("jump", 0.0, pytest.approx(5.0, abs=0.2)), ("run", pytest.approx(5.0, abs=0.2), 10.0)]


def test_a_long_action_is_one_segment_not_fragments() -> None:
    # 400 classes, no background, softmax of noisy logits; windows starting from 100 s to the
    # end see class 7: the curve ramps up over [100, 102] s and stays up to the end.
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 1.0, (400, 400))
    logits[200:400, 7] += 6.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    starts = np.arange(400) * 0.5
    segments = localize(starts, 2.0, probs, [f"c{k}" for k in range(400)], 201.5,
                        background=None)
    assert [(s.label, s.start_s, s.end_s) for s in segments] \
        == [("c7", pytest.approx(101.0, abs=0.5), 201.5)]


def test_max_segments_keeps_the_best() -> None:
    starts = window_starts(40.0, 2.0, 0.5)
    probs = window_probs(starts, 2.0, TRUTH, noise=0.2, rng=np.random.default_rng(0))
    every = localize(starts, 2.0, probs, LABELS, 40.0, background=0)
    assert localize(starts, 2.0, probs, LABELS, 40.0, background=0, max_segments=2) == every[:2]


def test_localize_states_expected_and_actual_shapes() -> None:
    starts = np.arange(5.0)
    with pytest.raises(BackendError, match=r"\[5, 4\] \(W windows, K labels\), got \[5, 3\]"):
        localize(starts, 2.0, np.full((5, 3), 0.3), LABELS, 10.0, background=0)
    with pytest.raises(BackendError, match=r"got \[4, 4\]"):
        localize(starts, 2.0, np.full((4, 4), 0.25), LABELS, 10.0, background=0)
    with pytest.raises(BackendError, match="background class must be an index in"):
        localize(starts, 2.0, np.full((5, 4), 0.25), LABELS, 10.0, background=4)
    with pytest.raises(BackendError, match="must lie in"):
        localize(starts, 2.0, np.full((5, 4), 2.0), LABELS, 10.0, background=0)


@pytest.mark.parametrize(("name", "value"), [("score_threshold", 1.5), ("nms_iou", 0.0),
                                             ("max_segments", 0)])
def test_localize_rejects_bad_parameters_by_name(name: str, value: float) -> None:
    with pytest.raises(InputError, match=name):
        localize(np.arange(5.0), 2.0, np.full((5, 4), 0.25), LABELS, 10.0, background=0,
                 **{name: value})

"""models/synthetic_video.py (untrimmed action videos, real H.264) and the demo action
classifier trained on them (models/c3d.py, models/train_video.py)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from cvserve.models.synthetic_video import (
    ACTIONS,
    IDLE_S,
    LABELS,
    SEGMENT_S,
    Segment,
    clip_label,
    make_action_clip,
    make_action_video,
    write_mp4,
)
from cvserve.models.train_video import (
    CLIP_LEN,
    DEMO_ACTIONS,
    FRAME_RATE,
    HELD_OUT_SEED,
    INPUT,
    decode_clips,
    evaluate_actions,
    export_demo_actions,
    load_actions,
)
from cvserve.worker.preprocess import preprocess_frames
from cvserve.worker.repository import InputSpec, load_config
from cvserve.worker.video import VideoLimits, probe_video, read_clips

# Measured 0.858 on held-out videos HELD_OUT_SEED .. +5 (0.764 over the README's 20); the
# floor leaves a margin for codec builds that decode a little differently.
HELD_OUT_FLOOR = 0.80


def test_same_seed_same_video() -> None:
    a, b = make_action_video(7), make_action_video(7)
    assert a.segments == b.segments
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(make_action_video(8).frames[:10], a.frames[:10])


@pytest.mark.parametrize("seed", range(12))
def test_segments_lie_inside_the_video_apart_from_each_other(seed: int) -> None:
    video = make_action_video(seed)
    assert video.segments, "every 10-20 s video shows at least one action"
    for seg in video.segments:
        assert seg.label in ACTIONS
        assert 0 < seg.start_s < seg.end_s <= video.duration_s
        assert SEGMENT_S[0] - 1e-3 <= seg.end_s - seg.start_s <= SEGMENT_S[1] + 1e-3
    for before, after in itertools.pairwise(video.segments):
        assert after.start_s - before.end_s >= IDLE_S[0] - 1e-3  # idle time between


def test_idle_time_is_still_and_action_time_moves() -> None:
    video = make_action_video(3, num_shapes=1)
    seg = video.segments[0]
    fps = video.fps

    def change(t0: float, t1: float) -> float:
        a, b = video.frames[round(t0 * fps)], video.frames[round(t1 * fps)]
        return float(np.abs(a.astype(np.int16) - b).mean())

    idle, moving = change(0.0, seg.start_s - 0.1), change(seg.start_s, seg.end_s - 0.1)
    assert idle < 6  # sensor noise only (sigma 4)
    assert moving > idle + 1


def test_mp4_is_h264_with_the_videos_duration_and_fps(tmp_path) -> None:
    video = make_action_video(11, duration_s=6.0)
    info = probe_video(video.mp4(), VideoLimits())
    assert (info.codec, info.width, info.height) == ("h264", 160, 120)
    assert info.fps == pytest.approx(25.0)
    assert info.duration_s == pytest.approx(video.duration_s, abs=1 / 25)
    path = tmp_path / "v.mp4"
    write_mp4(path, video.frames[:25], 12.5)
    info = probe_video(path.read_bytes(), VideoLimits())
    assert info.fps == pytest.approx(12.5) and info.duration_s == pytest.approx(2.0, abs=0.08)
    with pytest.raises(ValueError, match="even frame size"):
        write_mp4(io.BytesIO(), np.zeros((2, 15, 20, 3), np.uint8), 25)


@pytest.mark.parametrize("label", LABELS)
def test_trimmed_clip_is_labelled_with_its_action(label: str) -> None:
    clip = make_action_clip(label, seed=5, duration_s=2.0)
    assert clip.duration_s == pytest.approx(2.0)
    assert clip.clip_label(0.0, CLIP_LEN, FRAME_RATE) == label
    assert clip.segments == ([] if label == "none" else [Segment(label, 0.0, 2.0)])


@pytest.mark.parametrize("seed", range(6))
def test_spans_cut_a_video_into_trimmed_clips_of_one_label_each(seed: int) -> None:
    video = make_action_video(seed)
    spans = video.spans(min_idle_s=1.0)
    assert [s for s in spans if s.label != "none"] == video.segments
    for before, after in itertools.pairwise(spans):
        assert before.end_s <= after.start_s
    for span in spans:
        clip = video.cut(span.start_s, span.end_s)
        assert clip.duration_s == pytest.approx(span.end_s - span.start_s, abs=1.5 / video.fps)
        if span.label == "none":
            assert span.end_s - span.start_s >= 1.0 and clip.segments == []
        else:  # the action from its clip's first frame to its last
            (seg,) = clip.segments
            assert seg.label == span.label
            assert seg.start_s == pytest.approx(0.0, abs=1 / video.fps)
            assert seg.end_s == pytest.approx(clip.duration_s, abs=1 / video.fps)
        # It starts with the first frame shown at or after the span's start.
        first = next(i for i in range(len(video.frames)) if i / video.fps >= span.start_s - 1e-9)
        assert np.array_equal(clip.frames[0], video.frames[first])


def test_clip_label_is_the_label_covering_most_of_the_window() -> None:
    segments = [Segment("grow", 1.0, 3.0), Segment("blink", 4.0, 6.0)]
    assert clip_label(segments, 0.0, 1.6) == "none"  # 0.6 s of grow, 1.0 s idle
    assert clip_label(segments, 0.5, 1.6) == "grow"  # 1.1 s of grow
    assert clip_label(segments, 2.4, 1.6) == "none"  # 0.6 s grow, 1.0 s idle
    assert clip_label(segments, 3.5, 1.6) == "blink"  # 0.5 s idle, 1.1 s blink
    assert clip_label(segments, 2.8, 1.6) == "none"  # 0.2 grow, 1.0 idle, 0.4 blink
    assert clip_label([], 2.0, 1.6) == "none"


def test_decoded_clips_equal_the_servers_preprocessing() -> None:
    mp4 = make_action_video(21, duration_s=5.0).mp4()
    spec = InputSpec(**INPUT)
    got = decode_clips(mp4, [0.3, 2.9], spec)  # [2, 3, T, H, W]
    clips = read_clips(mp4, [0.3, 2.9], CLIP_LEN, FRAME_RATE, VideoLimits())
    want = np.stack([np.moveaxis(preprocess_frames(torch.from_numpy(clip).permute(0, 3, 1, 2),
                                                   spec, uint8_kernel=True)[0], 0, 1)
                     for clip in clips])
    assert got.shape == (2, 3, CLIP_LEN, *INPUT["size"])
    np.testing.assert_array_equal(got, want)


def test_demo_weights_classify_held_out_mp4_clips() -> None:
    assert DEMO_ACTIONS.stat().st_size < 10 * 1024 * 1024
    model, labels = load_actions()
    assert labels == list(LABELS)
    result = evaluate_actions(model, num_videos=6, first_seed=HELD_OUT_SEED)
    assert result["windows"] > 150
    assert result["accuracy"] >= HELD_OUT_FLOOR, result


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_exported_demo_matches_eager_for_any_batch_and_clip_len(tmp_path) -> None:
    import onnxruntime as ort

    model_dir = export_demo_actions(tmp_path / "repo")  # raises if the check fails
    cfg = load_config(model_dir)
    assert (cfg.task, cfg.weights_kind, cfg.inputs, cfg.outputs) == (
        "video-classification", "demo", ["video"], ["logits"])
    assert cfg.video is not None and cfg.video.background_label == "none"
    assert (cfg.video.layout, cfg.video.clip_len, cfg.video.frame_rate) == (
        "NCTHW", CLIP_LEN, FRAME_RATE)
    assert cfg.label_names() == list(LABELS)
    session = ort.InferenceSession(str(cfg.artifact()), providers=["CPUExecutionProvider"])
    model, _ = load_actions()
    for shape in ((3, 3, 24, 60, 80), (1, 3, 4, 60, 80)):
        video = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        (logits,) = session.run(["logits"], {"video": video.numpy()})
        with torch.inference_mode():
            ref = model(video).softmax(1)
        got = torch.from_numpy(logits).softmax(1)
        assert (got - ref).abs().max() <= 1e-4

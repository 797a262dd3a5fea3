"""Accuracy harness for /classify-video: held-out synthetic untrimmed videos, sent to the
service over HTTP, scored against their ground truth.

- video top-1: each video cut into its labelled stretches (every action segment, and
  every idle stretch of >= 1 s as `none`), each stretch sent as an MP4 of its own, the
  answer's top label against the stretch's: classification of trimmed clips, as Kinetics'
  and UCF101's top-1 are measured; also their mean class accuracy (each label's recall,
  averaged: about half the clips are `none`);
- clip accuracy: each sliding window of the untrimmed video (`clips=true`) against the
  label that covers most of that window (models/synthetic_video.py); also on the clear
  windows alone, those one label covers for >= 75 % (a window across a boundary is the
  rest: its label is a matter of tenths of a second);
- temporal mAP of `segments[]` (`localize=true`) at tIoU 0.3 / 0.5 / 0.7 and their mean,
  ActivityNet's definition (models/temporal_eval.py).

    python -m cvserve.models.video_accuracy                      # starts `cvserve run`
    python -m cvserve.models.video_accuracy --url http://127.0.0.1:8000 --model demo-actions
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from .synthetic_video import CLEAR_COVER, LABELS, make_action_video
from .temporal_eval import temporal_map

HELD_OUT_SEED = 20_000_000  # training draws its videos far below this
DEMO_MODEL = "demo-actions"
# About 230 trimmed clips: top-1 to within ~0.015 (one standard error); 10 videos give
# ~60, within ~0.03, too coarse to tell 0.95 from 0.98.
VIDEOS = 40
MIN_IDLE_S = 1.0  # shorter idle stretches are not scored as trimmed `none` clips


def _classify(url: str, model: str, mp4: bytes, timeout_s: float, **params: str) -> dict:
    r = httpx.post(f"{url}/classify-video", timeout=timeout_s + 30, trust_env=False,
                   params={"model": model, "top_k": 1, "async": "false",
                           "timeout_s": timeout_s, **params},
                   files={"file": ("video.mp4", mp4, "video/mp4")})
    if r.status_code != 200:
        raise RuntimeError(f"/classify-video answered {r.status_code}: {r.text}")
    return r.json()


def evaluate(url: str, model: str, videos: int = VIDEOS, seed: int = HELD_OUT_SEED,
             timeout_s: float = 300.0) -> dict[str, float]:
    """Trimmed-clip top-1, window accuracy and temporal mAP of `model` as served at `url`."""
    truth, predictions = [], []
    correct = total = clear_correct = clear_total = 0
    trimmed_hits: dict[str, list[bool]] = {}  # per true label
    for i in range(videos):
        video = make_action_video(seed + i)
        for span in video.spans(MIN_IDLE_S):
            mp4 = video.cut(span.start_s, span.end_s).mp4()
            top = _classify(url, model, mp4, timeout_s)["top"][0]["label"]
            trimmed_hits.setdefault(span.label, []).append(top == span.label)
        answer = _classify(url, model, video.mp4(), timeout_s, localize="true", clips="true")
        clip_len, rate = answer["video"]["clip_len"], answer["video"]["frame_rate"]
        for clip in answer["clips"]:
            cover = video.clip_coverage(clip["start_s"], clip_len, rate)
            hit = clip["top"][0]["label"] == LABELS[int(np.argmax(cover))]  # as clip_label
            correct, total = correct + hit, total + 1
            if cover.max() >= CLEAR_COVER:
                clear_correct, clear_total = clear_correct + hit, clear_total + 1
        truth += [{"video_id": i, "label": s.label, "start_s": s.start_s,
                   "end_s": s.end_s} for s in video.segments]
        predictions += [{"video_id": i, **s} for s in answer["segments"]]
    hits = [hit for label_hits in trimmed_hits.values() for hit in label_hits]
    return {"videos": videos, "trimmed_clips": len(hits),
            "top1": float(np.mean(hits)) if hits else 0.0,
            # Kinetics' second figure: each label's recall, averaged (`none` is one label)
            "mean_class_accuracy": float(np.mean([np.mean(h) for h in trimmed_hits.values()]))
            if hits else 0.0,
            "clips": total, "clip_accuracy": correct / max(total, 1),
            "clear_clips": clear_total,
            "clear_clip_accuracy": clear_correct / max(clear_total, 1),
            **temporal_map(truth, predictions)}


@contextmanager
def embedded(repository: Path) -> Iterator[str]:
    """`cvserve run` on a free port over `repository`; its URL once ready."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CVSERVE_MODEL_REPOSITORY": str(repository),
           "CVSERVE_AUTO_BUILD_DEFAULT": "false", "CVSERVE_PORT": str(port)}
    env.pop("CVSERVE_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "cvserve.app.cli", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"cvserve run exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError("cvserve run was not ready in 180 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running service (default: start `cvserve run` serving "
                                  "the demo action classifier)")
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--videos", type=int, default=VIDEOS)
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    args = ap.parse_args(argv)
    if args.url:
        scores = evaluate(args.url, args.model, args.videos, args.seed)
    else:
        from .train_video import export_demo_actions

        with tempfile.TemporaryDirectory() as tmp:
            export_demo_actions(Path(tmp))
            with embedded(Path(tmp)) as url:
                scores = evaluate(url, args.model, args.videos, args.seed)
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

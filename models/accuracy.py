"""The accuracy harness: every task measured end to end through the service's HTTP API on
held-out synthetic data (seeds never trained on), scored with standard tools.

- detection: POST /detect; box mAP@0.5 and mAP@[.5:.95] by pycocotools' COCOeval (bbox);
- instance masks: POST /detect?mask_format=rle; mask mAP by COCOeval (segm);
- semantic segmentation: POST /segment; mean IoU over background + the classes;
- video classification: POST /classify-video; top-1 of trimmed clips (each action
  segment and idle stretch of the held-out videos as its own MP4: the target's row);
  with clips=true on the untrimmed videos, top-1 of each 0.4 s window, and of the clear
  ones (one label covers >= 75 % of the window) (models/video_accuracy.py);
- temporal localization: POST /classify-video?localize=true; mAP at tIoU 0.3 / 0.5 / 0.7,
  ActivityNet's AP (models/temporal_eval.py);
- explanations: POST /explain?method=cam and gradcam; the pointing game of Zhang et al.
  2016 (models/explain_accuracy.py), and the classifier's top-1 from the same answers.

A task whose model is not served (or not given) is reported as such, with what would
serve it; the table says which rows meet the project's targets (issue 3).

    python bench/accuracy.py       # exports the demo models, starts `cvserve run` on them
    python bench/accuracy.py --url http://127.0.0.1:8000 --detector demo-detector
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from . import explain_accuracy, video_accuracy
from .evaluate import HELD_OUT_SEED as DETECTION_SEED
from .evaluate import box_map, coco_ground_truth, mask_map
from .synthetic import CLASSES, make_scene

# The targets for the demo models, per row's metric.
TARGETS = {"box mAP@0.5": 0.90, "mask mAP@0.5": 0.85, "mIoU": 0.85, "video top-1": 0.95,
           "temporal mAP@0.5": 0.80, "pointing game (cam)": 0.90,
           "pointing game (gradcam)": 0.90}
DEMO_MODELS = {"detector": "demo-detector", "instance": "demo-masks", "semantic": "demo-unet",
               "video": video_accuracy.DEMO_MODEL, "classifier": "demo-classifier"}


@dataclass
class Row:
    task: str
    model: str | None
    metric: str
    value: float | None
    n: int
    note: str = ""

    @property
    def target(self) -> float | None:
        return TARGETS.get(self.metric)

    @property
    def status(self) -> str:
        if self.value is None:
            return "not scored"
        if self.target is None:
            return ""
        return "meets target" if self.value >= self.target else "below target"


def _post(client: httpx.Client, path: str, data: bytes, **params: Any) -> dict[str, Any]:
    r = client.post(path, files={"file": ("scene.jpg", data, "image/jpeg")}, params=params)
    if r.status_code != 200:
        raise RuntimeError(f"{path} answered {r.status_code}: {r.text}")
    return r.json()


def _category(label: str) -> int:
    """The synthetic world's 1-based class id of a served label; 0 for a foreign label."""
    return CLASSES.index(label) + 1 if label in CLASSES else 0


def detection(url: str, model: str, n: int, masks: bool = False) -> list[Row]:
    """Box (and with `masks`, mask) mAP on scenes DETECTION_SEED .. + n - 1."""
    scenes = [make_scene(DETECTION_SEED + i) for i in range(n)]
    results = []
    params: dict[str, Any] = {"model": model, "score_threshold": 0.05, "max_detections": 100}
    if masks:
        params["mask_format"] = "rle"
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        for image_id, scene in enumerate(scenes, start=1):
            for d in _post(client, "/detect", scene.jpeg(), **params)["detections"]:
                b = d["box"]
                result = {"image_id": image_id, "category_id": _category(d["label"]),
                          "score": d["score"],
                          "bbox": [b["x1"], b["y1"], b["x2"] - b["x1"], b["y2"] - b["y1"]]}
                if masks:
                    result["segmentation"] = d["mask"]
                results.append(result)
    gt = coco_ground_truth(scenes)
    if masks:
        scores = mask_map(gt, results)
        return [Row("instance masks", model, "mask mAP@0.5", scores["map50"], n),
                Row("instance masks", model, "mask mAP@[.5:.95]", scores["map"], n)]
    scores = box_map(gt, results)
    return [Row("detection", model, "box mAP@0.5", scores["map50"], n),
            Row("detection", model, "box mAP@[.5:.95]", scores["map"], n)]


def semantic(url: str, model: str, n: int) -> list[Row]:
    """Mean IoU over background + CLASSES on scenes DETECTION_SEED .. + n - 1, at the
    photo's resolution; the served classes are matched to the world's by name
    ("background" or "__background__" is class 0, any other foreign label counts as 0)."""
    names = ["background", *CLASSES]
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        for i in range(n):
            scene = make_scene(DETECTION_SEED + i)
            answer = _post(client, "/segment", scene.jpeg(), model=model)
            png = base64.b64decode(answer["label_map"]["data"])
            with Image.open(io.BytesIO(png)) as im:
                served = np.array(im, dtype=np.int64)  # the served class ids
            lookup = np.zeros(max(served.max(), *(c["class_id"] for c in answer["classes"]))
                              + 1, dtype=np.int64)
            for c in answer["classes"]:
                lookup[c["class_id"]] = names.index(c["label"]) if c["label"] in names else 0
            predicted = lookup[served]
            truth = scene.label_map().astype(np.int64)
            confusion += np.bincount(truth.ravel() * len(names) + predicted.ravel(),
                                     minlength=len(names) ** 2).reshape(len(names), -1)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    return [Row("semantic segmentation", model, "mIoU", float(np.mean(inter / union)), n)]


def video(url: str, model: str, videos: int) -> list[Row]:
    s = video_accuracy.evaluate(url, model, videos)
    trimmed = (f"{s['trimmed_clips']} trimmed clips of {videos} videos: each action and "
               "idle stretch sent as its own MP4")
    windows = f"{s['clips']} 0.4 s-stride windows of the same videos, untrimmed"
    clear = (f"{s['clear_clips']} of those windows; one label covers "
             f">= {video_accuracy.CLEAR_COVER:.0%} of each")
    return [Row("video classification", model, "video top-1", s["top1"], videos, trimmed),
            Row("video classification", model, "video mean class accuracy",
                s["mean_class_accuracy"], videos, "the same clips, each label's recall averaged"),
            Row("video classification", model, "video top-1 (windows)", s["clip_accuracy"],
                videos, windows),
            Row("video classification", model, "video top-1 (clear windows)",
                s["clear_clip_accuracy"], videos, clear),
            *(Row("temporal localization", model, f"temporal mAP@{t}", s[f"map@{t}"], videos)
              for t in ("0.3", "0.5", "0.7"))]


def explanations(url: str, model: str, n: int) -> list[Row]:
    rows = []
    for method in ("cam", "gradcam"):
        s = explain_accuracy.pointing_game(url, model, method, n)
        rows.append(Row("explanations", model, f"pointing game ({method})", s["rate"], n))
    # Every /explain answer lists the top classes too: the classifier's own accuracy.
    rows.append(Row("image classification", model, "image top-1", s["accuracy"], n))
    return rows


def run(url: str, models: dict[str, str | None], n: int = 50,
        videos: int = video_accuracy.VIDEOS) -> list[Row]:
    """Every task whose model is given and served; a 'not scored' row for the rest."""
    served = {m["name"] for m in httpx.get(f"{url}/models", timeout=30,
                                           trust_env=False).json()["models"]}
    plan: dict[str, tuple[str, Callable[[str], list[Row]]]] = {
        "detector": ("detection", lambda m: detection(url, m, n)),
        "instance": ("instance masks", lambda m: detection(url, m, n, masks=True)),
        "semantic": ("semantic segmentation", lambda m: semantic(url, m, n)),
        "video": ("video classification", lambda m: video(url, m, videos)),
        "classifier": ("explanations", lambda m: explanations(url, m, n)),
    }
    rows: list[Row] = []
    for role, (task, score) in plan.items():
        model = models.get(role)
        if model is None:
            rows.append(Row(task, None, "", None, 0, "no model given"))
        elif model not in served:
            rows.append(Row(task, model, "", None, 0, f"{model} is not served at {url}"))
        else:
            rows.extend(score(model))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| task | model | metric | value | target | n | status | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        value = "" if r.value is None else f"{r.value:.3f}"
        target = "" if r.target is None else f"≥ {r.target:.2f}"
        lines.append(f"| {r.task} | {r.model or ''} | {r.metric} | {value} | {target} | "
                     f"{r.n or ''} | {r.status} | {r.note} |")
    return "\n".join(lines)


def export_demo_models(repository: Path) -> None:
    """The shipped demo models, exported as `cvserve run` would serve them."""
    from .classifier_demo import export_demo_classifier
    from .export import DEMO_MASK_WEIGHTS, DEMO_WEIGHTS, export_detector
    from .train_video import export_demo_actions
    from .unet_demo import export_demo_unet

    export_detector("tiny_fasterrcnn", repository, weights=str(DEMO_WEIGHTS),
                    name=DEMO_MODELS["detector"])
    export_detector("tiny_maskrcnn", repository, weights=str(DEMO_MASK_WEIGHTS),
                    name=DEMO_MODELS["instance"])
    export_demo_unet(repository, DEMO_MODELS["semantic"])
    export_demo_actions(repository)
    export_demo_classifier(repository, DEMO_MODELS["classifier"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running service (default: export the demo models into "
                                  "a temporary folder and start `cvserve run` on them)")
    for role, default in DEMO_MODELS.items():
        ap.add_argument(f"--{role}", default=default, help=f"model to score (default: {default})")
    ap.add_argument("--n", type=int, default=100, help="held-out images per image task")
    ap.add_argument("--videos", type=int, default=video_accuracy.VIDEOS,
                    help="held-out untrimmed videos")
    ap.add_argument("--out", type=Path, default=Path("accuracy.json"))
    args = ap.parse_args(argv)
    models = {role: getattr(args, role) for role in DEMO_MODELS}
    if args.url:
        rows = run(args.url, models, args.n, args.videos)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            export_demo_models(Path(tmp))
            with video_accuracy.embedded(Path(tmp)) as url:
                rows = run(url, models, args.n, args.videos)
    print(table(rows))
    args.out.write_text(json.dumps(
        [{**asdict(r), "target": r.target, "status": r.status} for r in rows], indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

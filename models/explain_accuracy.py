"""The pointing game over HTTP: do /explain's heatmaps point at the object they explain?

Zhang et al. 2016 ("Top-down neural attention by excitation backprop"): a heatmap hits when
its maximum lies inside the ground-truth box enlarged by 15 px. Held-out scenes of the demo
classifier's world (one shape each, models/classifier_demo.py) are sent to a running
service; each answer's grid cell of maximum value, mapped through `heatmap.region` to the
photo's pixels, is tested against the shape's box. The target is the true class, so the
map explains the right object even where the classifier is wrong.

    python -m cvserve.models.explain_accuracy --url http://127.0.0.1:8000 --n 100
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx
import numpy as np

from .classifier_demo import HELD_OUT_SEED, inside_box, pointing_scenes


def peak_in_image(heatmap: dict[str, Any]) -> tuple[float, float]:
    """The centre of the grid's strongest cell, in the photo's pixels (x, y)."""
    grid = np.asarray(heatmap["data"], dtype=np.float32)
    i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
    x1, y1, x2, y2 = heatmap["region"]
    rows, cols = grid.shape
    return x1 + (j + 0.5) / cols * (x2 - x1), y1 + (i + 0.5) / rows * (y2 - y1)


def pointing_game(url: str, model: str, method: str, n: int, seed: int = HELD_OUT_SEED,
                  timeout_s: float = 120.0) -> dict[str, Any]:
    """-> {method, n, hits, rate, accuracy (top-1 of the same answers)}."""
    hits = correct = 0
    with httpx.Client(timeout=timeout_s) as client:
        for jpeg, class_id, box in pointing_scenes(n, seed):
            r = client.post(f"{url}/explain", files={"file": jpeg},
                            params={"model": model, "method": method, "target": class_id})
            r.raise_for_status()
            body = r.json()
            hits += inside_box(peak_in_image(body["heatmap"]), box)
            correct += body["top"][0]["class_id"] == class_id
    return {"method": method, "n": n, "hits": hits, "rate": hits / n,
            "accuracy": correct / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="demo-classifier")
    p.add_argument("--methods", default="cam,gradcam",
                   help="comma-separated: cam, gradcam, gradcam++, saliency, guided-backprop, "
                        "guided-gradcam, occlusion")
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()
    for method in args.methods.split(","):
        print(json.dumps(pointing_game(args.url, args.model, method, args.n)))


if __name__ == "__main__":
    main()

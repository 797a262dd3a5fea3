"""Dynamic batching: concurrent requests of different sizes share batches, and every image
still gets exactly the answer it gets alone."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cvserve.models.synthetic import make_scene

from .conftest import Service, iou

# Photos of a few aspect ratios at many sizes: landscape 4:3, portrait 3:4, square, 16:9.
SIZES = [(640, 480), (480, 360), (800, 600), (360, 480), (600, 800), (320, 320),
         (500, 500), (640, 360), (1024, 768), (300, 400), (400, 400), (960, 540)]


def detect(url: str, model: str, data: bytes) -> list[dict]:
    r = httpx.post(f"{url}/detect", params={"model": model, "score_threshold": 0.3},
                   files={"file": ("x.jpg", data, "image/jpeg")}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["detections"]


def batch_histogram(url: str, model: str) -> tuple[float, float]:
    """(executions, executions with batch size 1) from the worker's Prometheus histogram."""
    text = httpx.get(f"{url}/metrics").text

    def value(pattern: str) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else 0.0
    total = value(rf'cvserve_inference_batch_size_count{{model="{model}"}} (\S+)')
    ones = value(rf'cvserve_inference_batch_size_bucket{{le="1.0",model="{model}"}} (\S+)')
    return total, ones


def assert_same_detections(alone: list[dict], batched: list[dict]) -> None:
    assert len(alone) == len(batched), (alone, batched)
    for a in alone:
        assert any(b["label"] == a["label"] and iou(a["box"], b["box"]) >= 0.99
                   and abs(a["score"] - b["score"]) <= 1e-3 for b in batched), (a, batched)


@pytest.mark.parametrize("model", ["demo-ts", "demo-onnx"])
def test_batched_boxes_equal_unbatched(demo_service: Service, model: str) -> None:
    images = [make_scene(200 + i, *SIZES[i % len(SIZES)]).jpeg() for i in range(16)]
    alone = [detect(demo_service.url, model, data) for data in images]
    assert sum(len(d) for d in alone) >= 16, "the demo detector finds the shapes"
    before = batch_histogram(demo_service.url, model)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda d: detect(demo_service.url, model, d), images))
    after = batch_histogram(demo_service.url, model)
    runs, runs_of_one = after[0] - before[0], after[1] - before[1]
    assert runs_of_one < runs, "concurrent requests formed batches larger than 1"
    assert runs < 16, f"16 requests ran in {runs} executions"
    for a, b in zip(alone, together, strict=True):
        assert_same_detections(a, b)

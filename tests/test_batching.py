"""Dynamic batching: concurrent requests of different sizes share batches, and every image
still gets exactly the answer it gets alone."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cvserve.app.queue import Job, MemoryQueue, Reply, now_ms
from cvserve.app.settings import Settings
from cvserve.models.synthetic import make_scene
from cvserve.worker.batcher import ModelRunner
from cvserve.worker.repository import load_config
from cvserve.worker.server import build_task

from .conftest import Service, iou
from .costed_models import PerCall, write_model

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


def test_a_redelivered_job_runs_in_a_batch_of_its_own(tmp_path: Path) -> None:
    """A job reclaimed from a dead worker (deliveries > 1) may be what killed it: it runs
    alone, so the first-time jobs queued with it still share their batch."""
    write_model(tmp_path, "per-call", PerCall(5),
                'policy = "fixed"\nmax_batch_size = 8\nmax_queue_delay_ms = 2000')
    task = build_task(load_config(tmp_path / "per-call"), Settings(device="cpu"))
    images = [make_scene(i, 160, 120).jpeg() for i in range(8)]

    async def serve() -> tuple[list[int], list[Reply]]:
        queue = MemoryQueue(max_queue=100, retry_after_s=1)
        answers = [await queue.submit(Job(model="per-call", task="detection", payload=data,
                                          deadline_ms=now_ms() + 60_000,
                                          deliveries=2 if i % 2 else 1))
                   for i, data in enumerate(images)]
        runner = ModelRunner(task, queue, ThreadPoolExecutor(2))
        runner.start()
        try:
            replies = await asyncio.wait_for(asyncio.gather(*answers), 60)
        finally:
            await runner.stop()
        return runner.batch_sizes, replies

    sizes, replies = asyncio.run(serve())
    assert all(reply.ok for reply in replies), replies
    # The 4 first deliveries wait for each other (max_queue_delay_ms) and share one batch;
    # the 4 redelivered ones never join a batch.
    assert sorted(sizes) == [1, 1, 1, 1, 4], sizes

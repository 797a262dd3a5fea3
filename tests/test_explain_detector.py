"""/explain on a detector: a map per detection by occlusion (D-RISE-style), through real
HTTP. The reference is computed here from the eager torchvision model (the demo detector's
weights) on occluded copies the test makes itself; the ground truth of the generated
scenes says whether each map points at its object.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from cvserve.models.export import build_eager, export_detector
from cvserve.models.synthetic import make_scene

from .conftest import DEMO_CHECKPOINT, Service, batch_counts, embedded_service, pin_batching

MODEL = "demo-detector"
FILL = (124, 116, 104)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explain-det-repo")
    export_detector("tiny_fasterrcnn", root, weights=str(DEMO_CHECKPOINT), name=MODEL,
                    check=False)
    pin_batching(root / MODEL)  # batches of up to 4, as model.toml says
    return root


@pytest.fixture(scope="module")
def service(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with embedded_service({"CVSERVE_MODEL_REPOSITORY": str(repo)},
                          tmp_path_factory.mktemp("explain-det-logs")) as svc:
        yield svc


def explain(service: Service, data: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{service.url}/explain", params={"model": MODEL, **params},
                      files={"file": data}, timeout=300)


def peak(heatmap: dict) -> tuple[float, float]:
    grid = np.array(heatmap["data"])
    i, j = np.unravel_index(int(grid.argmax()), grid.shape)
    x1, y1, x2, y2 = heatmap["region"]
    rows, cols = grid.shape
    return x1 + (j + 0.5) * (x2 - x1) / cols, y1 + (i + 0.5) * (y2 - y1) / rows


def test_maps_equal_an_eager_occlusion_sweep(service: Service) -> None:
    scene = make_scene(11, 240, 180)
    data = scene.jpeg()
    r = explain(service, data, patch=60, stride=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "occlusion"
    assert body["occlusion"] == {"patch": 60, "stride": 30, "positions": 35}
    dets = body["detections"]
    assert dets, "the demo detector finds the shape"
    # The reference: the eager model (torchvision's FasterRCNN with the demo weights) on
    # every copy with a grey 60 px square at (y, x), D-RISE's similarity per detection.
    eager, _ = build_eager("tiny_fasterrcnn", str(DEMO_CHECKPOINT))
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    image = image.permute(2, 0, 1)
    copies = []
    for y in range(0, 180 - 60 + 1, 30):
        for x in range(0, 240 - 60 + 1, 30):
            c = image.clone()
            c[:, y:y + 60, x:x + 60] = torch.tensor(FILL)[:, None, None]
            copies.append(c.float() / 255)
    with torch.no_grad():
        found = eager(copies)
    for det in dets:
        box = torch.tensor([[det["box"][k] for k in ("x1", "y1", "x2", "y2")]])
        drops = []
        for out in found:
            same = out["labels"] == det["class_id"]
            sim = (box_iou(box, out["boxes"][same])[0] * out["scores"][same]).max() \
                if same.any() else torch.tensor(0.0)
            drops.append(max(0.0, det["score"] - float(sim)))
        expected = np.array(drops).reshape(5, 7)
        expected = expected / expected.max()
        np.testing.assert_allclose(det["heatmap"]["data"], expected, atol=0.01)
        assert det["heatmap"]["region"] == [15.0, 15.0, 225.0, 165.0]


def test_each_map_points_at_its_object(service: Service) -> None:
    """The pointing game (a hit: the map's peak inside the object's box enlarged by 15 px)
    for every detection that matches a ground-truth shape (IoU >= 0.5)."""
    hits = total = 0
    for seed in (21, 22, 23, 24):
        scene = make_scene(seed, 320, 240, max_objects=2)
        r = explain(service, scene.jpeg(), score_threshold=0.5)
        assert r.status_code == 200, r.text
        for det in r.json()["detections"]:
            box = [det["box"][k] for k in ("x1", "y1", "x2", "y2")]
            truth = [o.box for o in scene.objects
                     if float(box_iou(torch.tensor([box]), torch.tensor([o.box]))) >= 0.5]
            if not truth:
                continue
            total += 1
            x, y = peak(det["heatmap"])
            x1, y1, x2, y2 = truth[0]
            hits += x1 - 15 <= x <= x2 + 15 and y1 - 15 <= y <= y2 + 15
    assert total >= 4, "too few matched detections to judge"
    assert hits >= 0.8 * total, f"{hits} of {total} maps point at their object"


def test_copies_batch_and_detect_is_unchanged_beside_them(service: Service) -> None:
    photo = make_scene(31, 320, 240).jpeg()
    alone = httpx.post(f"{service.url}/detect", files={"file": photo}, timeout=60).json()
    before = batch_counts(service.url, MODEL)
    with httpx.Client(timeout=300) as client:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(2) as pool:
            explained = pool.submit(explain, service, make_scene(32, 320, 240).jpeg())
            detected = [pool.submit(client.post, f"{service.url}/detect",
                                    files={"file": photo}) for _ in range(3)]
            assert explained.result().status_code == 200
            answers = [d.result().json() for d in detected]
    after = batch_counts(service.url, MODEL)
    runs, items = after[0] - before[0], after[1] - before[1]
    assert items >= 3 + 1 + 100 and runs < items / 2, "the occluded copies ran in batches"
    for answer in answers:
        assert answer["detections"] == alone["detections"]


def test_png_and_errors(service: Service) -> None:
    data = make_scene(11, 240, 180).jpeg()
    r = explain(service, data, patch=60, stride=30, format="png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (240, 180)
    r = explain(service, data, method="gradcam")
    assert r.status_code == 400 and "method=occlusion" in r.json()["error"]["message"]
    r = explain(service, data, patch=500)
    assert r.status_code == 400 and "larger than the image" in r.json()["error"]["message"]

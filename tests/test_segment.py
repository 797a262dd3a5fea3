"""/segment and instance masks on /detect: served answers against eager torchvision.

The references are the eager torchvision models (built here, their weights handed to the
exporter as a checkpoint), run the way torchvision documents them: semantic models on
`weights.transforms()` output with the logits resized to the original image, Mask R-CNN
with its own transform and mask pasting. Everything goes through real HTTP.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils

from cvserve.models.export import _calibrate_batchnorm, export_detector
from cvserve.models.segment_export import export_segmenter
from cvserve.models.synthetic import make_scene
from cvserve.worker.imaging import decode_rgb

from .conftest import Service, free_port, pin_batching

# pycocotools 2.0.11's decode trips numpy 2's __array__ deprecation; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SEMANTIC = "lraspp_mobilenet_v3_large"
# Small and few: random weights' detections all pass a floor of 0, and the mask head
# runs once per detection (100 would take ~10 s an image here).
MASKRCNN_SIZE = {"min_size": 320, "max_size": 512}
DETECTIONS = 12


def photo(seed: int, width: int, height: int) -> bytes:
    return make_scene(seed, width, height).jpeg()


def calibrated(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with real BatchNorm statistics (see export._calibrate_batchnorm)."""
    model.train()
    with torch.no_grad():
        for i in range(3):
            x = torch.from_numpy(np.array(make_scene(seed + i, 320, 320).image))
            model(x.permute(2, 0, 1)[None].float().div(255).repeat(2, 1, 1, 1))
    return model.eval()


@pytest.fixture(scope="module")
def eager_semantic() -> torch.nn.Module:
    torch.manual_seed(3)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21)
    return calibrated(model, 30)


@pytest.fixture(scope="module")
def eager_maskrcnn() -> torch.nn.Module:
    torch.manual_seed(4)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.0,
        box_detections_per_img=DETECTIONS, **MASKRCNN_SIZE)
    _calibrate_batchnorm(model, 40)
    return model.eval()


@pytest.fixture(scope="module")
def eager_keypoints() -> torch.nn.Module:
    torch.manual_seed(5)
    model = torchvision.models.detection.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, box_score_thresh=0.0,
        box_detections_per_img=4, **MASKRCNN_SIZE)
    _calibrate_batchnorm(model, 50)
    return model.eval()


@pytest.fixture(scope="module")
def seg_repo(eager_semantic: torch.nn.Module, eager_maskrcnn: torch.nn.Module,
             eager_keypoints: torch.nn.Module,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eager models' weights exported: the semantic one as ONNX and TorchScript,
    Mask R-CNN as TorchScript; batching pinned so that tests of batches get batches."""
    repo = tmp_path_factory.mktemp("repo-seg")
    ckpt = tmp_path_factory.mktemp("ckpt")
    torch.save(eager_semantic.state_dict(), ckpt / "semantic.pt")
    torch.save(eager_maskrcnn.state_dict(), ckpt / "maskrcnn.pt")
    for fmt in ("onnx", "torchscript"):
        export_segmenter(SEMANTIC, repo, weights=str(ckpt / "semantic.pt"), fmt=fmt,
                         name=f"semantic-{fmt}", check=False)
        pin_batching(repo / f"semantic-{fmt}")
    export_detector("maskrcnn_resnet50_fpn", repo, weights=str(ckpt / "maskrcnn.pt"),
                    fmt="torchscript", name="maskrcnn", score_floor=0.0,
                    detections_per_img=DETECTIONS, check=False, **MASKRCNN_SIZE)
    pin_batching(repo / "maskrcnn")
    torch.save(eager_keypoints.state_dict(), ckpt / "keypoints.pt")
    export_detector("keypointrcnn_resnet50_fpn", repo, weights=str(ckpt / "keypoints.pt"),
                    fmt="torchscript", name="keypoints", score_floor=0.0,
                    detections_per_img=4, check=False, **MASKRCNN_SIZE)
    return repo


@pytest.fixture(scope="module")
def seg_service(seg_repo: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Service]:
    svc = Service("run", {"CVSERVE_MODEL_REPOSITORY": str(seg_repo),
                          "CVSERVE_AUTO_BUILD_DEFAULT": "false"},
                  tmp_path_factory.mktemp("logs"), port=free_port()).start()
    try:
        yield svc.wait_ready(timeout=240)  # Mask R-CNN's warm-up: a minute or more here
    finally:
        svc.stop()


def post(url: str, path: str, data: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", params=params, timeout=120,
                      files={"file": ("image.jpg", data, "image/jpeg")})


def label_map_of(answer: dict) -> np.ndarray:
    png = base64.b64decode(answer["label_map"]["data"])
    return np.array(Image.open(io.BytesIO(png)))


@torch.no_grad()
def eager_label_map(model: torch.nn.Module, data: bytes) -> np.ndarray:
    """torchvision's documented use: weights.transforms() preprocessing, logits resized
    to the original image, argmax."""
    image, _ = decode_rgb(data, 10**9)
    preset = torchvision.models.segmentation.LRASPP_MobileNet_V3_Large_Weights.DEFAULT
    x = preset.transforms()(image)[None]
    logits = model(x)["out"]
    logits = F.interpolate(logits, size=tuple(image.shape[-2:]), mode="bilinear",
                           align_corners=False)
    return logits[0].argmax(0).numpy()


# --- semantic ------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["semantic-onnx", "semantic-torchscript"])
def test_semantic_label_map_matches_eager_torchvision(
        seg_service: Service, eager_semantic: torch.nn.Module, model: str) -> None:
    for seed, (w, h) in enumerate([(480, 360), (300, 420)]):
        data = photo(seed, w, h)
        answer = post(seg_service.url, "/segment", data, model=model).json()
        served = label_map_of(answer)
        assert served.shape == (h, w)
        agree = (served == eager_label_map(eager_semantic, data)).mean()
        assert agree >= 0.995, f"{model} agrees with eager on {agree:.4f} of pixels"
        fractions = {c["class_id"]: c["fraction"] for c in answer["classes"]}
        for class_id, fraction in fractions.items():
            assert fraction == pytest.approx((served == class_id).mean(), abs=1e-5)
        assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-4)


def test_semantic_rle_decodes_to_the_label_map(seg_service: Service) -> None:
    data = photo(5, 400, 300)
    label_map = label_map_of(post(seg_service.url, "/segment", data,
                                  model="semantic-onnx").json())
    answer = post(seg_service.url, "/segment", data, model="semantic-onnx",
                  mask_format="rle").json()
    assert "label_map" not in answer
    for entry in answer["classes"]:
        rle = {"size": entry["mask"]["size"], "counts": entry["mask"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle), label_map == entry["class_id"])


def test_semantic_batched_equals_alone(seg_service: Service) -> None:
    """Concurrent requests are batched (same resized size: one aspect ratio) and answer
    as each alone; a different aspect ratio in the mix changes nothing."""
    images = [photo(10 + i, 640, 480) for i in range(3)] + [photo(20, 480, 640)]
    alone = [label_map_of(post(seg_service.url, "/segment", d, model="semantic-onnx").json())
             for d in images]
    with httpx.Client(timeout=120) as client:
        from concurrent.futures import ThreadPoolExecutor

        def one(d: bytes) -> dict:
            return client.post(f"{seg_service.url}/segment", params={"model": "semantic-onnx"},
                               files={"file": ("i.jpg", d, "image/jpeg")}).json()

        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(one, images * 2))
    for i, answer in enumerate(together):
        np.testing.assert_array_equal(label_map_of(answer), alone[i % len(images)])


def test_semantic_png_answers(seg_service: Service) -> None:
    data = photo(6, 333, 250)
    overlay = httpx.post(f"{seg_service.url}/segment", params={"model": "semantic-onnx"},
                         headers={"Accept": "image/png"}, timeout=120,
                         files={"file": ("i.jpg", data, "image/jpeg")})
    assert overlay.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(overlay.content))
    assert picture.format == "PNG" and picture.size == (333, 250) and picture.mode == "RGB"
    labels = post(seg_service.url, "/segment", data, model="semantic-onnx", format="png",
                  render="labels")
    raw = np.array(Image.open(io.BytesIO(labels.content)))
    json_map = label_map_of(post(seg_service.url, "/segment", data,
                                 model="semantic-onnx").json())
    np.testing.assert_array_equal(raw, json_map)


# --- instance ------------------------------------------------------------------------

@torch.no_grad()
def eager_instances(model: torch.nn.Module, data: bytes) -> dict[str, torch.Tensor]:
    image, _ = decode_rgb(data, 10**9)
    return model([image.float() / 255])[0]


def decisive_masks(ref: dict[str, torch.Tensor], count: int) -> list[int]:
    """The first `count` detections that no near-tie can reorder (score gap > 1e-3)."""
    scores = ref["scores"]
    out = []
    for i in range(len(scores)):
        gaps = (scores - scores[i]).abs()
        gaps[i] = 1.0
        if float(gaps.min()) > 1e-3:
            out.append(i)
        if len(out) == count:
            break
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("path", ["/segment", "/detect"])
def test_instance_masks_match_eager_mask_rcnn(seg_service: Service,
                                              eager_maskrcnn: torch.nn.Module,
                                              path: str) -> None:
    data = photo(7, 420, 300)
    ref = eager_instances(eager_maskrcnn, data)
    answer = post(seg_service.url, path, data, model="maskrcnn", score_threshold=0.0).json()
    served = answer["detections"]
    assert len(served) == len(ref["scores"])
    checked = decisive_masks(ref, 10)
    assert checked, "no decisive detection to compare"
    for i in checked:
        d = min(served, key=lambda s: abs(s["score"] - float(ref["scores"][i])))
        assert d["class_id"] == int(ref["labels"][i])
        rle = {"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}
        got = mask_utils.decode(rle).astype(bool)
        assert got.shape == (300, 420)
        want = ref["masks"][i, 0].numpy() > 0.5
        assert mask_iou(got, want) >= 0.98


def test_instance_batched_equals_alone(seg_service: Service) -> None:
    images = [photo(30 + i, 400, 300) for i in range(2)] + [photo(40, 800, 600)]
    alone = [post(seg_service.url, "/segment", d, model="maskrcnn",
                  score_threshold=0).json()["detections"] for d in images]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda d: post(seg_service.url, "/segment", d,
                                                model="maskrcnn",
                                                score_threshold=0).json()["detections"],
                                 images))
    for a, b in zip(alone, together, strict=True):
        assert [d["mask"] for d in a] == [d["mask"] for d in b]
        assert [d["class_id"] for d in a] == [d["class_id"] for d in b]


def test_instance_polygons_and_png(seg_service: Service) -> None:
    """Polygons trace the same masks as the RLE answer. Random weights' masks are pixel
    noise, which COCO polygons (no holes, no lone pixels) cannot follow closely, so here
    each polygon must lie inside its box and its raster inside the RLE mask;
    tests/test_masks.py checks how faithfully solid shapes are traced."""
    data = photo(8, 360, 280)
    rle = post(seg_service.url, "/segment", data, model="maskrcnn",
               score_threshold=0).json()["detections"]
    poly = post(seg_service.url, "/segment", data, model="maskrcnn", score_threshold=0,
                mask_format="polygon").json()["detections"]
    assert len(rle) == len(poly) == DETECTIONS
    traced = 0
    for r, p in zip(rle, poly, strict=True):
        assert r["box"] == p["box"]
        want = mask_utils.decode({"size": r["mask"]["size"],
                                  "counts": r["mask"]["counts"].encode()}).astype(bool)
        if not p["mask"]:
            continue
        box = p["box"]
        for polygon in p["mask"]:
            assert len(polygon) >= 6 and len(polygon) % 2 == 0
            xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
            assert box["x1"] - 1 <= xs.min() and xs.max() <= box["x2"] + 1
            assert box["y1"] - 1 <= ys.min() and ys.max() <= box["y2"] + 1
        got = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p["mask"], 280, 360)))
        assert (got.astype(bool) & want).sum() >= 0.85 * got.sum()
        traced += 1
    assert traced >= DETECTIONS // 2
    picture = post(seg_service.url, "/segment", data, model="maskrcnn", format="png",
                   score_threshold=0)
    image = Image.open(io.BytesIO(picture.content))
    assert image.format == "PNG" and image.size == (360, 280)


def test_keypoints_on_detect_match_eager_keypoint_rcnn(
        seg_service: Service, eager_keypoints: torch.nn.Module) -> None:
    """Keypoint R-CNN on /detect: each person's 17 named keypoints in original pixels,
    as the eager model returns them (its own resize back included)."""
    data = photo(11, 400, 300)
    ref = eager_instances(eager_keypoints, data)
    served = post(seg_service.url, "/detect", data, model="keypoints",
                  score_threshold=0).json()["detections"]
    names = torchvision.models.detection.KeypointRCNN_ResNet50_FPN_Weights.DEFAULT.meta[
        "keypoint_names"]
    assert len(served) == len(ref["scores"]) > 0
    for i in decisive_masks(ref, 4):
        d = min(served, key=lambda s: abs(s["score"] - float(ref["scores"][i])))
        assert [k["name"] for k in d["keypoints"]] == names
        got = np.array([[k["x"], k["y"], k["score"]] for k in d["keypoints"]])
        np.testing.assert_allclose(got[:, :2], ref["keypoints"][i, :, :2].numpy(), atol=0.01)
        np.testing.assert_allclose(got[:, 2], ref["keypoints_scores"][i].numpy(), atol=1e-3)
    picture = post(seg_service.url, "/detect", data, model="keypoints", format="png")
    assert Image.open(io.BytesIO(picture.content)).size == (400, 300)


# --- errors --------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "params", "fragment"), [
    ("/segment", {"model": "semantic-onnx", "mask_format": "polygon"}, "mask_format"),
    ("/segment", {"model": "semantic-onnx", "render": "heatmap"}, "render"),
    ("/segment", {"model": "maskrcnn", "mask_format": "png"}, "mask_format"),
    ("/segment", {"model": "maskrcnn", "render": "labels", "format": "png"}, "render"),
    ("/detect", {"model": "semantic-onnx"}, "semantic-segmentation model"),
    ("/segment", {"model": "nope"}, "not served"),
])
def test_bad_segment_requests_are_json_errors(seg_service: Service, path: str,
                                              params: dict, fragment: str) -> None:
    r = post(seg_service.url, path, photo(9, 64, 48), **params)
    assert r.status_code in (400, 404)
    assert fragment in r.json()["error"]["message"]


def test_undecodable_upload_is_415(seg_service: Service) -> None:
    r = post(seg_service.url, "/segment", b"not an image")
    assert r.status_code == 415 and r.json()["error"]["code"]


# --- YOLOv8-seg masks through the letterbox geometry -----------------------------------

class ConstantSeg(torch.nn.Module):
    """A YOLOv8-seg-shaped model that sees one object whatever the image: box (cx, cy, w, h)
    = (32, 16, 40, 20) in 64x64 input pixels, class 0 at 0.9, one prototype whose mask
    logit is +10 everywhere (the decoder crops it to the box)."""

    def __init__(self) -> None:
        super().__init__()
        box_class_coefficient = torch.tensor([32.0, 16.0, 40.0, 20.0, 0.9, 1.0])
        self.register_buffer("pred", box_class_coefficient[None, :, None])
        self.register_buffer("protos", torch.full((1, 1, 16, 16), 10.0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = images.sum(dim=(1, 2, 3)) * 0  # [B]: keeps the batch dimension
        return (self.pred + zero[:, None, None],  # [B, 4 + 1 class + 1 coefficient, 1 anchor]
                self.protos + zero[:, None, None, None])  # [B, 1 prototype, 16, 16]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy ONNX exporter
def test_yolov8_seg_mask_maps_back_through_the_letterbox(tmp_path: Path) -> None:
    """A 128x64 photo letterboxed (top-left) into 64x64 at half scale: the box's mask,
    (12, 6)-(52, 26) in model pixels, is pixels 24..103 x 12..51 of the photo."""
    from cvserve.app.queue import Job
    from cvserve.app.settings import Settings
    from cvserve.worker.repository import load_config
    from cvserve.worker.server import build_task

    folder = tmp_path / "seg"
    folder.mkdir()
    torch.onnx.export(ConstantSeg(), (torch.zeros(1, 3, 64, 64),), str(folder / "m.onnx"),
                      dynamo=False, input_names=["images"], output_names=["pred", "protos"],
                      dynamic_axes={"images": {0: "b"}, "pred": {0: "b"}, "protos": {0: "b"}})
    (folder / "labels.txt").write_text("thing\n")
    (folder / "model.toml").write_text('''task = "instance-segmentation"
backend = "onnx"
file = "m.onnx"
inputs = ["images"]
outputs = ["pred", "protos"]

[input]
scale = 0.00392156862745098
mean = [0, 0, 0]
std = [1, 1, 1]
resize = "letterbox"
size = [64, 64]

[output]
decoder = "yolov8-seg"
''')
    task = build_task(load_config(folder), Settings(device="cpu"))
    photo_jpeg = make_scene(1, 128, 64).jpeg()
    item = task.prepare(Job(model="seg", task="instance-segmentation", payload=photo_jpeg,
                            deadline_ms=0, params={}))
    [output] = task.run([item])
    [detection] = task.finish(item, output)[0]["detections"]
    assert detection["box"] == {"x1": 24.0, "y1": 12.0, "x2": 104.0, "y2": 52.0}
    mask = mask_utils.decode({"size": detection["mask"]["size"],
                              "counts": detection["mask"]["counts"].encode()}).astype(bool)
    want = np.zeros((64, 128), dtype=bool)
    want[12:52, 24:104] = True
    np.testing.assert_array_equal(mask, want)

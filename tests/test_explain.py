"""/explain through real HTTP, against references that are not ours.

The served classifier is a torchvision ResNet-18 (random weights, BatchNorm calibrated,
ONNX artifact + state dict). Its references are built here: the eager ResNet from the same
state dict, explained by pytorch-grad-cam, or run by a direct eager forward for the
classes and occlusion. Inputs: torchvision's own transforms (Resize(256) + CenterCrop(224)
+ Normalize) for the classes; for the maps, the served preprocessing itself. Its resize
differs from torchvision's uint8 kernel by one level on some pixels, and on random weights
a gradient map of a low-scoring class moves with that (Grad-CAM at layer3 for class 7:
correlation 0.982 from torchvision's input, 1.0000 from ours; an occlusion map's cells
move by up to 0.034), so the maps are compared on the input the worker really built;
preprocessing parity has its own tests (tests/test_preprocess.py). The method formulas
are held to pytorch-grad-cam in tests/test_explain_methods.py.
"""

from __future__ import annotations

import asyncio
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
from torchvision.transforms import v2

from cvserve.models.classifiers import export_resnet
from cvserve.models.synthetic import make_scene
from cvserve.worker.imaging import decode_rgb
from cvserve.worker.preprocess import preprocess
from cvserve.worker.repository import load_config

from .conftest import Service, batch_counts, embedded_service

ARCH = "resnet18"
BATCHING = """[batching]
policy = "fixed"
max_batch_size = 8
max_queue_delay_ms = 30.0
"""


def photo(seed: int, width: int = 320, height: int = 240) -> bytes:
    return make_scene(seed, width, height).jpeg()


def reference_input(data: bytes) -> torch.Tensor:
    """torchvision's ImageNet evaluation transform on the decoded photo. # [1, 3, 224, 224]"""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True),
                            v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return transform(image)[None]


def served_input(data: bytes, model_dir: Path) -> torch.Tensor:
    """The input the worker builds from the upload (decode + model.toml preprocessing)."""
    image, _ = decode_rgb(data, 10**8)
    return torch.from_numpy(preprocess(image, load_config(model_dir).input)[0])[None]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def at_input(grid: list[list[float]], size: int = 224) -> np.ndarray:
    """A served heatmap grid upsampled bilinearly to the model input, as the reference's."""
    t = torch.tensor(grid, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explain-repo")
    folder = export_resnet(ARCH, root, weights="random", fmt="onnx")
    toml = folder / "model.toml"
    text = toml.read_text()
    start = text.index("[batching]")
    end = text.index("[", start + 1)
    toml.write_text(text[:start] + BATCHING + "\n" + text[end:])
    return root


@pytest.fixture(scope="module")
def eager(repo: Path) -> torch.nn.Module:
    net = torchvision.models.get_model(ARCH, weights=None, num_classes=1000)
    net.load_state_dict(torch.load(repo / ARCH / "weights.pt", weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def service(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with embedded_service({"CVSERVE_MODEL_REPOSITORY": str(repo)},
                          tmp_path_factory.mktemp("explain-logs")) as svc:
        yield svc


def explain(service: Service, data: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{service.url}/explain", params=params, files={"file": data},
                      timeout=120)


def test_gradcam_matches_pytorch_grad_cam_on_the_eager_model(service: Service, repo: Path,
                                                             eager: torch.nn.Module) -> None:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    for seed, (method, reference) in enumerate((("gradcam", GradCAM),
                                                ("gradcam++", GradCAMPlusPlus))):
        data = photo(seed, 400, 300)
        r = explain(service, data, method=method)
        assert r.status_code == 200, r.text
        body = r.json()
        x = reference_input(data)
        with torch.no_grad():
            probs = eager(x).softmax(dim=1)[0]
        top = int(probs.argmax())
        assert body["target"]["class_id"] == top
        assert body["target"]["score"] == pytest.approx(float(probs[top]), abs=1e-3)
        assert body["layer"] == "layer4" and body["heatmap"]["shape"] == [7, 7]
        with reference(model=eager, target_layers=[eager.layer4]) as cam:
            ref = cam(input_tensor=served_input(data, repo / ARCH),
                      targets=[ClassifierOutputTarget(top)])[0]
        assert correlation(at_input(body["heatmap"]["data"]), ref) >= 0.99, method


def test_a_chosen_target_and_layer(service: Service, repo: Path,
                                   eager: torch.nn.Module) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    data = photo(5)
    r = explain(service, data, method="gradcam", target="class_7", layer="layer3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target"]["class_id"] == 7 and body["layer"] == "layer3"
    assert body["heatmap"]["shape"] == [14, 14]
    with GradCAM(model=eager, target_layers=[eager.layer3]) as cam:
        ref = cam(input_tensor=served_input(data, repo / ARCH),
                  targets=[ClassifierOutputTarget(7)])[0]
    assert correlation(at_input(body["heatmap"]["data"]), ref) >= 0.99


def test_every_method_answers_a_map_of_the_crop(service: Service) -> None:
    data = photo(11, 320, 240)
    info = httpx.get(f"{service.url}/models/{ARCH}").json()
    assert set(info["explain_methods"]) == {"gradcam", "gradcam++", "cam", "saliency",
                                            "guided-backprop", "guided-gradcam", "occlusion"}
    targets = set()
    for method in info["explain_methods"]:
        r = explain(service, data, method=method, patch=64, stride=32, top_k=3)
        assert r.status_code == 200, (method, r.text)
        body = r.json()
        grid = np.array(body["heatmap"]["data"])
        assert list(grid.shape) == body["heatmap"]["shape"]
        assert grid.min() >= 0 and grid.max() == pytest.approx(1, abs=1e-3), method
        # Shorter side 240 -> 256 (x 16/15), a 224 crop: 210 x 210 original pixels from
        # the middle (the crop's left edge rounds to column 58 of 341 resized ones).
        # Occlusion's 6 x 6 cells are centred on the 64-px patches, 32 px apart: they tile
        # input pixels 16-208 of the crop.
        expected = ([69.4, 30.0, 249.6, 210.0] if method == "occlusion"
                    else [54.4, 15.0, 264.6, 225.0])
        assert body["heatmap"]["region"] == pytest.approx(expected, abs=0.1)
        assert body["image"] == {"width": 320, "height": 240}
        assert len(body["top"]) == 3 and body["top"][0]["class_id"] == body["target"][
            "class_id"]
        targets.add(body["target"]["class_id"])
    assert len(targets) == 1  # every method explains the same top-1


def test_occlusion_equals_an_eager_sweep_and_runs_batched(service: Service, repo: Path,
                                                          eager: torch.nn.Module) -> None:
    data = photo(21, 300, 300)
    before = batch_counts(service.url, ARCH)
    r = explain(service, data, method="occlusion", patch=56, stride=28)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["occlusion"] == {"patch": 56, "stride": 28, "positions": 49}
    after = batch_counts(service.url, ARCH)
    runs, jobs = after[0] - before[0], after[1] - before[1]
    assert jobs == 50 and runs < 50 / 2, "the occluded copies ran in batches"
    # The reference: every occluded copy through the eager model, the target's drop.
    x = served_input(data, repo / ARCH)
    target = body["target"]["class_id"]
    copies = []
    for y in range(0, 224 - 56 + 1, 28):
        for xx in range(0, 224 - 56 + 1, 28):
            c = x.clone()
            c[:, :, y:y + 56, xx:xx + 56] = 0
            copies.append(c)
    with torch.no_grad():
        base = eager(x).softmax(dim=1)[0, target]
        probs = eager(torch.cat(copies)).softmax(dim=1)[:, target]
    drops = (base - probs).clamp(min=0).reshape(7, 7)
    expected = (drops / drops.max()).numpy()
    np.testing.assert_allclose(np.array(body["heatmap"]["data"]), expected, atol=0.005)


def test_concurrent_requests_batch_and_equal_single_ones(service: Service) -> None:
    images = [photo(30 + i) for i in range(6)]
    single = [explain(service, d, method="saliency").json() for d in images]
    before = batch_counts(service.url, ARCH)

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(
                f"{service.url}/explain", params={"method": "saliency"}, files={"file": d})
                for d in images))

    together = asyncio.run(all_at_once())
    after = batch_counts(service.url, ARCH)
    assert after[1] - before[1] == 6 and after[0] - before[0] < 6, "requests batched"
    for one, r in zip(single, together, strict=True):
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["target"] == one["target"]
        np.testing.assert_allclose(got["heatmap"]["data"], one["heatmap"]["data"], atol=1e-3)


def test_png_answers(service: Service) -> None:
    data = photo(40, 320, 240)
    r = httpx.post(f"{service.url}/explain", files={"file": data},
                   headers={"Accept": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    overlay = np.array(Image.open(io.BytesIO(r.content)))
    original = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    assert overlay.shape == original.shape
    # Outside the crop (region 54.4, 15, 264.6, 225) the photo as sent; inside, the map.
    assert np.array_equal(overlay[:, :54], original[:, :54])
    assert np.array_equal(overlay[:14], original[:14])
    assert np.abs(overlay[16:224, 56:264].astype(int) - original[16:224, 56:264]).mean() > 10
    for method in ("saliency", "occlusion"):
        r = explain(service, data, method=method, format="png", render="heatmap",
                    patch=64, stride=32)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (320, 240)


@pytest.mark.parametrize(("params", "status", "says"), [
    ({"method": "gradcam  "}, 400, "gradcam%2B%2B"),  # '+' sent unescaped
    ({"method": "lime"}, 400, "method must be one of"),
    ({"layer": "layer9"}, 400, "top-level layers: conv1"),
    ({"method": "saliency", "layer": "layer4"}, 400, "layer applies to"),
    ({"target": 1000}, 400, "0 .. 999"),
    ({"target": "zebra"}, 400, "neither a class id nor a label"),
    ({"method": "occlusion", "patch": 4, "stride": 1}, 400, "at most 1024"),
    ({"method": "occlusion", "patch": 300}, 400, "larger than the model input"),
    ({"render": "jet"}, 400, "overlay or heatmap"),
    ({"model": "nope"}, 404, "not served"),
])
def test_bad_requests_are_clear(service: Service, params: dict, status: int,
                                says: str) -> None:
    r = explain(service, photo(50), **params)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_not_an_image(service: Service) -> None:
    r = httpx.post(f"{service.url}/explain", files={"file": b"plain text, not a photo"},
                   timeout=30)
    assert r.status_code == 415 and "error" in r.json()
    assert explain(service, photo(51)).status_code == 200  # the worker is fine


def test_filters_png_shows_the_first_convolution(service: Service,
                                                 eager: torch.nn.Module) -> None:
    r = httpx.get(f"{service.url}/models/{ARCH}/filters.png", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    grid = np.array(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    # 64 filters of 7x7, drawn 6x (42 px), 8 to a row, 2 px apart.
    assert grid.shape == (8 * 44 + 2, 8 * 44 + 2, 3)
    weights = eager.conv1.weight.detach()
    for k in (0, 9, 63):
        w = weights[k]
        expected = ((w - w.min()) / (w.max() - w.min()) * 255).round().permute(1, 2, 0)
        row, col = divmod(k, 8)
        tile = grid[2 + row * 44:2 + row * 44 + 42:6, 2 + col * 44:2 + col * 44 + 42:6]
        np.testing.assert_allclose(tile, expected.numpy(), atol=1)
    r = httpx.get(f"{service.url}/models/nope/filters.png", timeout=10)
    assert r.status_code == 404 and "not served" in r.json()["error"]["message"]


def test_3d_filters_are_rows_of_frames() -> None:
    from cvserve.worker.filters import filters_png

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 3, 3, 5, 5)).astype(np.float32)  # [O, C, t, kh, kw]
    grid = np.array(Image.open(io.BytesIO(filters_png(weights))).convert("RGB")).astype(int)
    tile = 5 * (48 // 5)  # 45 px
    assert grid.shape == (4 * (tile + 2) + 2, 3 * (tile + 2) + 2, 3)  # 4 rows of 3 frames
    w = torch.from_numpy(weights[2])
    frame = ((w - w.min()) / (w.max() - w.min()) * 255).round()[:, 1].permute(1, 2, 0)
    y, x = 2 + 2 * (tile + 2), 2 + 1 * (tile + 2)  # filter 2, frame 1
    np.testing.assert_allclose(grid[y:y + tile:9, x:x + tile:9], frame.numpy(), atol=1)

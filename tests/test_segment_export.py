"""Export for segmentation and keypoints: Mask R-CNN's and Keypoint R-CNN's cores give what
the eager torchvision model computes (TorchScript and ONNX alike, no detections included),
and torchvision's semantic segmenters export, check and load as model.toml declares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes, resize_keypoints
from torchvision.ops import box_iou

from cvserve.models.detector_core import detector_core
from cvserve.models.export import (
    ExportError,
    build_eager,
    decisive,
    export_detector,
    export_onnx,
    script_core,
    trace_inputs,
)
from cvserve.models.segment_export import SEGMENTERS, export_segmenter, run_artifact, verify
from cvserve.models.segment_export import build_eager as build_segmenter
from cvserve.models.synthetic import make_scene
from cvserve.worker.repository import load_config

from .conftest import REPO_ROOT

MIN_SIZE = 320  # R-CNN inputs resized to 320 px (torchvision's default: 800): fast enough
# |mask probability diff|, onnxruntime vs eager: its convolutions sum in another order, and
# boxes ~3e-4 px apart sample RoIAlign a little elsewhere (measured: 1e-4 to 6e-4 with
# random weights; a mask is cut at 0.5).
ONNX_MASK_ATOL = 1e-3
SCORE_TOL = 1e-4  # decisive detections, artifact vs eager: scores differ by < 1e-6
# Mask R-CNN's score floor: random weights score every class near 1/91, so a floor of 0
# sends 90 classes x 1000 proposals through NMS, seconds per image; twice 1/91 keeps the
# tens of detections these tests compare.
MASK_FLOOR = 0.02


def scene(seed: int, width: int = 400, height: int = 300) -> torch.Tensor:
    """A generated scene as the detectors take it. # [3, H, W] float in [0, 1]"""
    rgb = np.array(make_scene(seed, width, height).image)
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def eager_run(model: nn.Module, image: torch.Tensor) -> tuple[dict, dict, torch.Tensor,
                                                               torch.Tensor]:
    """The eager torchvision model on one image. -> (its RoI heads' detections in
    resized-image pixels, its final output in original pixels, the core's inputs:
    images [1, 3, h, w] as the model batched them and image_sizes [1, 2])"""
    seen: dict = {}

    def keep(module: nn.Module, args: tuple, output: tuple) -> None:
        # A copy: the model's postprocess rewrites these dicts in place.
        seen["heads"] = {k: v.clone() for k, v in output[0][0].items()}

    hook = model.roi_heads.register_forward_hook(keep)
    try:
        with torch.no_grad():
            final = model([image])[0]
            batched, _ = model.transform([image])
    finally:
        hook.remove()
    return seen["heads"], final, batched.tensors, torch.tensor(batched.image_sizes)


def matched_rows(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
                 ) -> list[tuple[int, int]]:
    """(ref row, got row) for each of ref's decisive detections; asserts each is found."""
    pairs = []
    ious = box_iou(ref["boxes"], got["boxes"])
    for i in decisive(ref, SCORE_TOL):
        same = ((ious[i] >= 0.99) & (got["labels"] == ref["labels"][i])
                & ((got["scores"] - ref["scores"][i]).abs() <= SCORE_TOL))
        assert same.any(), f"decisive detection {i} of the eager model not reproduced"
        pairs.append((i, int(same.nonzero()[0])))
    return pairs


@pytest.fixture(scope="module")
def maskrcnn() -> nn.Module:
    model, _ = build_eager("maskrcnn_resnet50_fpn", "random", score_floor=MASK_FLOOR,
                           min_size=MIN_SIZE)
    model.roi_heads.detections_per_img = 20  # the mask head runs per detection
    return model


@pytest.fixture(scope="module")
def keypointrcnn() -> nn.Module:
    model, _ = build_eager("keypointrcnn_resnet50_fpn", "random", score_floor=0.0,
                           min_size=MIN_SIZE)
    # The keypoint head (8 convolutions of 512 channels) runs per detection: 10, not 100,
    # keep this test fast; the code paths are the same.
    model.roi_heads.detections_per_img = 10
    return model


@pytest.mark.slow
def test_maskrcnn_scripted_core_gives_the_eager_masks_before_pasting(maskrcnn: nn.Module
                                                                      ) -> None:
    image = scene(0)
    heads, final, images, sizes = eager_run(maskrcnn, image)
    with torch.no_grad():
        boxes, scores, labels, counts, masks = script_core(maskrcnn)(images, sizes)
    k, n = maskrcnn.roi_heads.detections_per_img, len(heads["scores"])
    assert masks.shape == (1, k, 28, 28) and int(counts[0]) == n > 0
    assert torch.equal(boxes[0, :n], heads["boxes"]) and torch.equal(labels[0, :n],
                                                                     heads["labels"])
    assert torch.equal(scores[0, :n], heads["scores"])
    torch.testing.assert_close(masks[0, :n], heads["masks"][:, 0], atol=1e-4, rtol=0)
    assert (scores[0, n:] == -1).all() and (masks[0, n:] == 0).all()
    # What the worker does with them (boxes back to the original size, masks pasted into
    # it) reproduces the eager model's own output.
    original = list(image.shape[-2:])
    boxes_px = resize_boxes(boxes[0, :n], sizes[0].tolist(), original)
    torch.testing.assert_close(boxes_px, final["boxes"])
    pasted = paste_masks_in_image(masks[0, :n, None], boxes_px, original)
    torch.testing.assert_close(pasted, final["masks"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_maskrcnn_onnx_matches_eager_and_runs_an_image_without_detections(
        maskrcnn: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A score floor between the top scores of the image the graph is traced on and of a
    # flat grey image: traced with detections, the graph must still run with none.
    core = detector_core(maskrcnn)
    grey = torch.full((3, 300, 400), 0.5)
    with torch.no_grad():
        traced_top = float(core(*trace_inputs(maskrcnn, 1))[1].max())
    grey_heads, _, grey_images, grey_sizes = eager_run(maskrcnn, grey)
    grey_top = max(grey_heads["scores"].tolist(), default=MASK_FLOOR)
    assert traced_top > grey_top + 1e-3, (traced_top, grey_top)
    floor = (traced_top + grey_top) / 2
    monkeypatch.setattr(maskrcnn.roi_heads, "score_thresh", floor)
    export_onnx(maskrcnn, tmp_path, (1,))
    session = ort.InferenceSession(str(tmp_path / "model.b1.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "scores", "labels", "counts", "masks"]

    heads, _, images, sizes = eager_run(maskrcnn, scene(0))
    out = dict(zip(names, session.run(None, {"images": images.numpy(),
                                              "image_sizes": sizes.numpy()}), strict=True))
    n = int(out["counts"][0])
    got = {k: torch.from_numpy(out[k][0, :n]) for k in ("boxes", "scores", "labels", "masks")}
    pairs = matched_rows(heads, got)
    assert len(pairs) >= 3, f"too few decisive detections to compare ({len(pairs)})"
    for i, j in pairs:
        torch.testing.assert_close(got["masks"][j], heads["masks"][i, 0], atol=ONNX_MASK_ATOL,
                                   rtol=0)

    _, scores, _, counts, masks = session.run(None, {"images": grey_images.numpy(),
                                                     "image_sizes": grey_sizes.numpy()})
    assert counts.tolist() == [0] and (scores == -1).all() and not masks.any()
    assert masks.shape == (1, maskrcnn.roi_heads.detections_per_img, 28, 28)


@pytest.mark.slow
def test_maskrcnn_torchscript_export_serves_the_eager_detections(tmp_path: Path) -> None:
    # export_detector's own check: served (alone and batched) vs eager, boxes and scores.
    path = export_detector("maskrcnn_resnet50_fpn", tmp_path, weights="random",
                           fmt="torchscript", min_size=MIN_SIZE, score_floor=MASK_FLOOR)
    cfg = load_config(path)
    assert cfg.task == "instance-segmentation"
    assert cfg.outputs == ["boxes", "scores", "labels", "counts", "masks"]
    assert (cfg.input.min_size, cfg.input.max_size) == (MIN_SIZE, 533)


@pytest.mark.slow
def test_keypointrcnn_scripted_core_gives_the_eager_keypoints(keypointrcnn: nn.Module) -> None:
    image = scene(1)
    heads, final, images, sizes = eager_run(keypointrcnn, image)
    with torch.no_grad():
        out = script_core(keypointrcnn)(images, sizes)
    boxes, scores, _, counts, keypoints, keypoint_scores = out
    k, n = keypointrcnn.roi_heads.detections_per_img, len(heads["scores"])
    assert keypoints.shape == (1, k, 17, 3) and keypoint_scores.shape == (1, k, 17)
    assert int(counts[0]) == n > 0 and torch.equal(scores[0, :n], heads["scores"])
    assert torch.equal(keypoints[0, :n], heads["keypoints"])  # resized-image pixels
    assert torch.equal(keypoint_scores[0, :n], heads["keypoints_scores"])
    assert not keypoints[0, n:].any() and not keypoint_scores[0, n:].any()
    # Mapped back to the original image as the eager model's postprocess maps them.
    original = list(image.shape[-2:])
    torch.testing.assert_close(resize_keypoints(keypoints[0, :n], sizes[0].tolist(), original),
                               final["keypoints"])
    torch.testing.assert_close(resize_boxes(boxes[0, :n], sizes[0].tolist(), original),
                               final["boxes"])


def test_keypointrcnn_export_names_its_keypoints_and_outputs(tmp_path: Path) -> None:
    path = export_detector("keypointrcnn_resnet50_fpn", tmp_path, weights="random",
                           fmt="torchscript", min_size=MIN_SIZE, check=False)
    cfg = load_config(path)
    assert cfg.task == "detection"
    assert cfg.outputs == ["boxes", "scores", "labels", "counts", "keypoints",
                           "keypoint_scores"]
    assert cfg.label_names() == ["__background__", "person"]
    names = cfg.keypoint_names()
    assert len(names) == 17 and names[:3] == ["nose", "left_eye", "right_eye"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_semantic_segmenter_exports_checked_with_free_batch_and_size(fmt: str,
                                                                     tmp_path: Path) -> None:
    path = export_segmenter("lraspp_mobilenet_v3_large", tmp_path, weights="random", fmt=fmt)
    cfg = load_config(path)
    assert (cfg.task, cfg.backend, cfg.output.decoder) == ("semantic-segmentation", fmt,
                                                          "semantic-logits")
    assert (cfg.inputs, cfg.outputs) == (["images"], ["logits"])
    assert (cfg.input.resize, cfg.input.resize_shorter, cfg.input.antialias) == (
        "shorter", 520, True)
    assert cfg.input.mean == (0.485, 0.456, 0.406) and cfg.weights_kind == "random"
    labels = cfg.label_names()
    assert len(labels) == 21 and labels[:2] == ["__background__", "aeroplane"]
    for shape in [(1, 3, 520, 600), (2, 3, 544, 520)]:
        logits = run_artifact(cfg.artifact(), torch.randn(shape))
        assert logits.shape == (shape[0], 21, *shape[2:])


def test_segmenter_check_refuses_an_artifact_of_other_weights(tmp_path: Path) -> None:
    path = export_segmenter("lraspp_mobilenet_v3_large", tmp_path, weights="random",
                            fmt="onnx", seed=0, check=False)
    other, _ = build_segmenter("lraspp_mobilenet_v3_large", "random", seed=1)
    with pytest.raises(ExportError, match="argmax class matches"):
        verify(other, path / "model.onnx", "lraspp_mobilenet_v3_large")


def test_unknown_architectures_name_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="lraspp_mobilenet_v3_large"):
        export_segmenter("unet", tmp_path, weights="random")
    with pytest.raises(ExportError, match="keypointrcnn_resnet50_fpn.*deeplabv3_resnet50"):
        export_detector("maskrcnn_resnet101_fpn", tmp_path, weights="random")
    assert not list(tmp_path.iterdir())


def test_export_command_dispatches_segmenters(tmp_path: Path) -> None:
    env = {**os.environ, "CVSERVE_MODEL_REPOSITORY": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "cvserve.app.cli", "models", "export",
                        "lraspp_mobilenet_v3_large", "--weights", "random", "--format", "onnx",
                        "--as", "seg"], env=env, cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_config(tmp_path / "seg").task == "semantic-segmentation"
    # Pretrained weights, offline (an unreachable proxy): a clear message, nothing written.
    offline = {**env, "TORCH_HOME": str(tmp_path / "hub"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "cvserve.app.cli", "models", "export",
                        SEGMENTERS[0]], env=offline, cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "--weights random" in r.stderr
    assert not (tmp_path / SEGMENTERS[0]).exists()

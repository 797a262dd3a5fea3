"""Image classifiers for /explain: the eager module behind an artifact, and ResNet export.

A classifier's model folder holds the artifact (ONNX or TorchScript, outputs `logits` and
`features`: the last feature map before global average pooling, so CAM is forward-only)
and what rebuilds the eager module the gradient methods need (model.toml `[explain]`):
the architecture's name and, where its weights do not come from a package, a state dict.

    cvserve models export resnet50 --weights random   # or default (downloads), or a .pt
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn

from .export import (
    ExportError,
    _quiet_exporters,
    calibrate_batchnorm,
    move_into_place,
    scene_batch,
    write_model_toml,
)

log = logging.getLogger("cvserve.export")

# torchvision classifiers whose last feature map is `layer4` and whose head is `fc` after
# global average pooling: the ResNet family.
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
# ImageNet preprocessing as torchvision's classification presets do it: shorter side to
# 256 (antialiased bilinear), centre crop 224, mean / std.
# torchvision's 3-D ResNets (Kinetics-400): `layer4` then `fc` after global pooling too.
VIDEO_RESNETS = ("r3d_18", "mc3_18", "r2plus1d_18")
IMAGENET_INPUT = {"layout": "NCHW", "color": "RGB", "scale": 1 / 255,
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "resize": "center-crop", "size": [224, 224], "resize_shorter": 256,
                  "antialias": True}
OUTPUT = {"decoder": "classification-logits", "activation": "softmax", "features": "features"}
# ResNet-50 on 2 CPU cores: ~110 ms for one image, ~95 ms per image in a batch of 4; the
# warm-up measures it and decides whether to wait for a batch.
BATCHING = {"max_batch_size": 8, "max_queue_delay_ms": 5.0}
LOGIT_TOL = 1e-3


class ResNetLogitsAndFeatures(nn.Module):
    """A torchvision ResNet -> (logits [B, C], features [B, K, h, w]); the logits are
    fc(mean over h, w of features), exactly the ResNet's own forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        features = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return n.fc(features.mean((2, 3))), features


def build_resnet(arch: str, weights: str, num_classes: int | None = None
                 ) -> tuple[nn.Module, list[str], str]:
    """(eager ResNet, class names, provenance): weights default (download), random
    (BatchNorm calibrated on generated scenes, so maps are not degenerate) or a state dict."""
    if arch not in RESNETS:
        raise ExportError(f"unknown classifier '{arch}' (have: {', '.join(RESNETS)})")
    if weights == "default":
        try:
            net = torchvision.models.get_model(arch, weights="DEFAULT")
        except Exception as exc:  # urllib / http / hash errors all mean: no weights here
            raise ExportError(f"could not download the pretrained weights for {arch} ({exc}); "
                              "offline, use --weights random or a state dict file") from exc
        meta = torchvision.models.get_model_weights(arch).DEFAULT.meta
        return net.eval(), list(meta["categories"]), "pretrained (ImageNet-1k, torchvision)"
    if weights == "random":
        torch.manual_seed(0)
        classes = num_classes or 1000
        net = torchvision.models.get_model(arch, weights=None, num_classes=classes)
        calibrate_batchnorm(net, normalize_imagenet(scene_batch(0, n=8, size=224)))
        return net.eval(), [f"class_{i}" for i in range(classes)], "random"
    path = Path(weights)
    if not path.is_file():
        raise ExportError(f"--weights must be default, random or a state dict file; "
                          f"'{weights}' is none of them")
    state = torch.load(path, map_location="cpu", weights_only=True)
    classes = num_classes or int(state["fc.weight"].shape[0])
    net = torchvision.models.get_model(arch, weights=None, num_classes=classes)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit {arch} with {classes} classes: {exc}") from exc
    return net.eval(), [f"class_{i}" for i in range(classes)], f"checkpoint {path.name}"


def normalize_imagenet(images: torch.Tensor) -> torch.Tensor:
    """# [N, 3, H, W] in [0, 1] -> ImageNet-normalized."""
    mean = torch.tensor(IMAGENET_INPUT["mean"])[:, None, None]
    std = torch.tensor(IMAGENET_INPUT["std"])[:, None, None]
    return (images - mean) / std


def export_resnet(arch: str, repository: Path, weights: str = "default", fmt: str = "onnx",
                  name: str | None = None, check: bool = True) -> Path:
    """Write `repository/name/`: artifact (logits + features), weights.pt (the eager state
    dict, for the gradient methods), labels.txt, model.toml. Checked against the eager
    model before it is moved into place."""
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"--format must be onnx or torchscript, got '{fmt}'")
    net, labels, provenance = build_resnet(arch, weights)
    wrapper = ResNetLogitsAndFeatures(net).eval()
    name = name or arch
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name
        out.mkdir()
        example = torch.zeros(1, 3, 224, 224)
        with torch.no_grad(), _quiet_exporters():
            if fmt == "torchscript":
                file = "model.pt"
                torch.jit.trace(wrapper, example).save(str(out / file))
            else:
                file = "model.onnx"
                torch.onnx.export(
                    wrapper, (example,), str(out / file), dynamo=False, opset_version=17,
                    input_names=["images"], output_names=["logits", "features"],
                    dynamic_axes={n: {0: "batch"} for n in ("images", "logits", "features")})
        if check:
            log.info("checked %s against the eager model: %s", name,
                     verify(net, out / file))
        torch.save(net.state_dict(), out / "weights.pt")
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        kind = "random" if weights == "random" else "pretrained"
        write_model_toml(out / "model.toml", {
            "task": "classification", "backend": fmt, "file": file, "architecture": arch,
            "weights": provenance, "weights_kind": kind, "labels": "labels.txt",
            "inputs": ["images"], "outputs": ["logits", "features"],
        }, {"input": IMAGENET_INPUT, "output": OUTPUT, "batching": BATCHING,
            "explain": {"weights": "weights.pt", "layer": "layer4", "head": "fc"}})
        return move_into_place(out, repository, name)


def verify(net: nn.Module, artifact: Path) -> str:
    """The artifact vs the eager model on a batch of 2 generated scenes; raises ExportError."""
    images = normalize_imagenet(scene_batch(7, n=2, size=224))
    with torch.inference_mode():
        ref = net(images)
    if artifact.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    else:
        with _quiet_exporters():
            module = torch.jit.load(str(artifact), map_location="cpu")
        with torch.inference_mode():
            logits = module(images)[0]
    diff = float((logits - ref).abs().max())
    if diff > LOGIT_TOL:
        raise ExportError(f"{artifact.name} disagrees with the eager model: max |logit diff| "
                          f"{diff:.2e} > {LOGIT_TOL:g}")
    return f"max |logit diff| {diff:.1e}"


def build_eager(architecture: str | None, model_dir: Path, weights_file: str | None,
                num_classes: int) -> nn.Module:
    """The eager module of a served image or video classifier, for /explain's gradient
    methods: forward gives the logits the artifact gives."""
    state = None
    if weights_file is not None:
        state = torch.load(model_dir / weights_file, map_location="cpu", weights_only=True)
    if architecture in (*RESNETS, *VIDEO_RESNETS):
        net = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    elif architecture == "efficientnet_lite0":
        from .efficientnet import build_eager as build_lite0

        net = build_lite0()[0]
    elif architecture == "c3d_small":
        from .c3d import C3D

        net = C3D(num_classes)
    elif architecture == "demo_gap_cnn":
        from .classifier_demo import DemoClassifier

        net = DemoClassifier(num_classes)
    else:
        raise ValueError(f"no eager module for architecture '{architecture}' (known: "
                         f"{', '.join((*RESNETS, *VIDEO_RESNETS))}, efficientnet_lite0, "
                         "c3d_small, demo_gap_cnn)")
    if state is not None:
        net.load_state_dict(state)
    return net.eval()

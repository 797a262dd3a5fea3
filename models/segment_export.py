"""`cvserve models export` for torchvision's semantic segmenters -> checked artifact + model.toml.

FCN, DeepLabV3 and LR-ASPP (VOC's 21 classes). The artifact is the whole model: normalized
images in, `logits` = the model's "out" [B, C, H, W] at the input size out; batch, height
and width are free. Preprocessing is torchvision's `weights.transforms()`, written into
model.toml: shorter side to 520 px (bilinear, antialiased), / 255, ImageNet mean / std.
The auxiliary head (an FCN head on layer 3, for training) is dropped: nothing serves it.

Weights: `default` (torchvision's pretrained, downloaded), `random` (offline tests), or a
local state dict PATH. Before anything is written, the artifact and the eager model label
the same generated scenes (two input sizes, and a batch of 2): argmax maps must agree on
>= 99.5 % of pixels.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from .export import (
    ExportError,
    _quiet_exporters,
    calibrate_batchnorm,
    move_into_place,
    scene_batch,
    weights_kind,
    write_model_toml,
)
from .synthetic import make_scene

log = logging.getLogger("cvserve.export")

SEGMENTERS = (
    "fcn_resnet50",
    "deeplabv3_resnet50",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)
OUTPUT = {"decoder": "semantic-logits"}
BATCHING = {"max_batch_size": 4, "max_queue_delay_ms": 5.0}
MIN_AGREEMENT = 0.995  # share of pixels whose argmax class the artifact and eager agree on
# Check images (width, height): landscape and portrait resize to different input sizes.
CHECK_SIZES = ((480, 360), (300, 420))


class SegmenterLogits(nn.Module):
    """A torchvision segmenter -> its main head's logits.
    # images [B, 3, H, W] normalized -> logits [B, C, H, W]"""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


def _weights_enum(arch: str) -> WeightsEnum:
    if arch not in SEGMENTERS:
        raise ExportError(f"unknown segmentation architecture '{arch}'; known: "
                          f"{', '.join(SEGMENTERS)}")
    return torchvision.models.get_model_weights(arch).DEFAULT


def input_spec(arch: str) -> dict:
    """model.toml's [input]: the DEFAULT weights' transforms (readable offline), which
    torchvision's segmenters share whatever weights are loaded."""
    transforms = _weights_enum(arch).transforms()
    return {"layout": "NCHW", "color": "RGB", "scale": 1 / 255,
            "mean": [float(v) for v in transforms.mean],
            "std": [float(v) for v in transforms.std],
            "resize": "shorter", "resize_shorter": int(transforms.resize_size[0]),
            "antialias": bool(transforms.antialias)}


def build_eager(arch: str, weights: str, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The eager torchvision segmenter (auxiliary head dropped) and its class names."""
    enum = _weights_enum(arch)
    build = torchvision.models.get_model_builder(arch)
    labels = list(enum.meta["categories"])  # VOC: "__background__", "aeroplane", ...
    if weights == "default":
        try:
            model = build(weights=enum)
        except Exception as exc:  # urllib / http / hash errors all mean: no weights here
            raise ExportError(
                f"could not download the pretrained weights for {arch} ({exc}). Offline, "
                "use `--weights random` (for tests) or `--weights PATH` (a local "
                "checkpoint)") from exc
    elif weights == "random":
        torch.manual_seed(seed)
        model = build(weights=None, weights_backbone=None, num_classes=len(labels),
                      aux_loss=False)
        spec = input_spec(arch)
        mean, std = (torch.tensor(spec[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        calibrate_batchnorm(model, (scene_batch(seed) - mean) / std)
    else:
        model, labels = _from_checkpoint(arch, build, Path(weights), labels)
    if getattr(model, "aux_classifier", None) is not None:  # FCN, DeepLabV3
        model.aux_classifier = None  # their forward skips the auxiliary head when None
    return model.eval(), labels


def _from_checkpoint(arch: str, build: Callable[..., nn.Module], path: Path,
                     labels: list[str]) -> tuple[nn.Module, list[str]]:
    if not path.is_file():
        raise ExportError(f"--weights must be default, random or a checkpoint file; "
                          f"'{path}' is none of them")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    labels = list(state.pop("_labels", None) or labels)
    aux = any(k.startswith("aux_classifier.") for k in state)
    model = build(weights=None, weights_backbone=None, num_classes=len(labels), aux_loss=aux)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit {arch} with {len(labels)} classes: "
                          f"{exc}") from exc
    return model, labels


def check_batches(arch: str) -> list[torch.Tensor]:
    """Generated scenes preprocessed by torchvision's own `weights.transforms()`: one image
    at each of two input sizes, then two images of one size as a batch.
    # each [B, 3, h, w] float, normalized"""
    transforms = _weights_enum(arch).transforms()

    def image(seed: int, size: tuple[int, int]) -> torch.Tensor:
        rgb = torch.from_numpy(np.array(make_scene(seed, *size).image)).permute(2, 0, 1)
        return transforms(rgb.contiguous())

    alone = [image(300 + i, size)[None] for i, size in enumerate(CHECK_SIZES)]
    pair = torch.stack([image(310 + i, CHECK_SIZES[0]) for i in range(2)])
    return [*alone, pair]


def run_artifact(path: Path, images: torch.Tensor) -> torch.Tensor:
    """The written artifact (model.onnx or model.pt) on a batch. # -> logits [B, C, H, W]"""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        return torch.from_numpy(logits)
    with _quiet_exporters():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(images)


def verify(model: nn.Module, artifact: Path, arch: str) -> str:
    """Artifact vs eager label maps on check_batches(); raises ExportError on a mismatch."""
    report = []
    for images in check_batches(arch):
        with torch.inference_mode():
            ref = model(images)["out"]
        got = run_artifact(artifact, images)
        if got.shape != ref.shape:
            raise ExportError(f"{artifact.name} gives logits {tuple(got.shape)} for input "
                              f"{tuple(images.shape)}; expected {tuple(ref.shape)}")
        agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
        if agree < MIN_AGREEMENT:
            raise ExportError(f"{artifact.name} disagrees with the eager model on input "
                              f"{tuple(images.shape)}: the argmax class matches on "
                              f"{agree:.2%} of pixels, under {MIN_AGREEMENT:.1%}")
        diff = float((got - ref).abs().max())
        report.append(f"{tuple(images.shape)}: {agree:.2%} agree, max |logit diff| {diff:.1e}")
    return "; ".join(report)


def _write_artifact(wrapper: nn.Module, out: Path, fmt: str) -> str:
    if fmt == "torchscript":
        with _quiet_exporters():
            torch.jit.script(wrapper).save(str(out / "model.pt"))
        return "model.pt"
    # Traced at batch 1 on a non-square input; the check runs other sizes and batch 2,
    # so a size baked into the graph fails it.
    example = torch.zeros(1, 3, 520, 600)
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), _quiet_exporters():
        torch.onnx.export(
            wrapper, (example,), str(out / "model.onnx"), dynamo=False, opset_version=17,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": axes, "logits": axes},
        )
    return "model.onnx"


def export_segmenter(arch: str, repository: Path, *, weights: str = "default",
                     fmt: str = "onnx", name: str | None = None, seed: int = 0,
                     check: bool = True) -> Path:
    """Build, check and write `repository/name/` (model.toml, labels.txt, artifact)."""
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"--format must be onnx or torchscript, got '{fmt}'")
    model, labels = build_eager(arch, weights, seed)
    name = name or arch
    with tempfile.TemporaryDirectory(dir=repository.parent if repository.exists() else None
                                     ) as tmp:
        out = Path(tmp) / name
        out.mkdir()
        file = _write_artifact(SegmenterLogits(model).eval(), out, fmt)
        if check:
            log.info("checked %s against the eager model: %s", name,
                     verify(model, out / file, arch))
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        provenance = {"default": "pretrained (torchvision DEFAULT)",
                      "random": f"random (seed {seed}; segments nothing meaningful)"}
        write_model_toml(out / "model.toml", {
            "task": "semantic-segmentation", "backend": fmt, "file": file,
            "architecture": arch,
            "weights": provenance.get(weights, f"checkpoint {Path(weights).name}"),
            "weights_kind": weights_kind(weights),
            "labels": "labels.txt",
            "inputs": ["images"], "outputs": ["logits"],
        }, {"input": input_spec(arch), "output": OUTPUT, "batching": BATCHING})
        return move_into_place(out, repository, name)

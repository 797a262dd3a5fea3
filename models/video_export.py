"""`cvserve models export` for video classifiers -> checked artifact + model.toml.

torchvision's Kinetics-400 video classifiers (r3d_18, mc3_18, r2plus1d_18, s3d, mvit_v2_s,
swin3d_t): the artifact takes `video` [B, 3, T, H, W] (normalized) and returns `logits`
[B, 400]. And the single-frame baseline: a torchvision ImageNet classifier run on each
sampled frame (`images` [N, 3, 224, 224] -> `logits` [N, 1000]), whose probabilities the
worker averages over each clip's frames (model.toml `[video] layout = "frames"`).

Preprocessing is torchvision's own `weights.transforms()`, written into model.toml:
VideoClassification resizes each frame (bilinear, antialias off: torchvision hard-codes it
to keep the trained models' results) to `resize_size`, crops `crop_size` from the centre,
/ 255 and mean / std; ImageClassification the same with antialias on. Clip sampling
(clip_len, frame_rate) is what each weights' accuracy was measured with (CLIPS).

Weights: `default` (torchvision's pretrained, downloaded), `random` (offline tests), or a
local state dict PATH. Before anything is written, the artifact and the eager model run
two generated clips: softmax probabilities must agree within PROB_TOL.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode

from .classifiers import VIDEO_RESNETS
from .export import (
    ExportError,
    _quiet_exporters,
    calibrate_batchnorm,
    move_into_place,
    weights_kind,
    write_model_toml,
)
from .synthetic import make_scene

log = logging.getLogger("cvserve.export")


@dataclasses.dataclass(frozen=True)
class ClipRecipe:
    """How an architecture's clips are sampled, and which clip lengths its artifact takes."""

    clip_len: int  # frames per clip, the model's T
    frame_rate: float  # frames per second sampled
    # The artifact takes any T >= min_clip_len (its graph pools over time adaptively).
    dynamic_clip_len: bool
    min_clip_len: int  # the shortest T the architecture takes: weights meta min_temporal_size


# clip_len and frame_rate: the parameters each weights' Kinetics-400 accuracy was measured
# with, from the weights' meta["_docs"] (torchvision 0.29), e.g. r3d_18: "estimated on
# video-level with parameters `frame_rate=15`, `clips_per_video=5`, and `clip_len=16`"
# (references/video_classification/README.md trains the video ResNets with --clip-len 16
# --frame-rate 15). s3d was trained on 64-frame clips (same README) but its accuracy is
# measured on one 128-frame clip; mvit_v2_s comes from SlowFast's 16x4 recipe (every 4th
# frame of 30 fps: 7.5 fps); swin3d_t from Video Swin's 32x2 (15 fps).
# T: the video ResNets pool adaptively (AdaptiveAvgPool3d); s3d averages over time after an
# AvgPool3d 2 of its T/8 time steps deep, hence at least 14 frames (meta min_temporal_size),
# any number above. mvit_v2_s
# is fixed at 16: its relative position embeddings are sized for T = 16 at build. swin3d_t
# takes any T eagerly, but torchvision clamps its window and drops the temporal shift when
# T / 2 <= 8 while the traced graph keeps the window and shift of the T it was traced at:
# a 16-frame clip through a 32-frame graph differs (measured: 2e-3 in the logits), so T is
# fixed there too.
CLIPS = {
    "r3d_18": ClipRecipe(16, 15.0, True, 1),
    "mc3_18": ClipRecipe(16, 15.0, True, 1),
    "r2plus1d_18": ClipRecipe(16, 15.0, True, 1),
    "s3d": ClipRecipe(128, 15.0, True, 14),
    "mvit_v2_s": ClipRecipe(16, 7.5, False, 16),
    "swin3d_t": ClipRecipe(32, 15.0, False, 1),
}
VIDEO_CLASSIFIERS = tuple(CLIPS)
# The single-frame baseline's image classifiers (ImageNet-1k, bilinear presets).
FRAME_CLASSIFIERS = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")
# Frame sampling for the single-frame baseline: 8 frames a second apart per clip cover
# 8 s, most of a 10 s Kinetics clip, for 8 image inferences a clip; an image model takes
# any number of frames.
FRAMES = {"layout": "frames", "clip_len": 8, "dynamic_clip_len": True, "frame_rate": 1.0,
          "num_clips": 5}
# Default uniform clips per video: the video ResNets' and mvit_v2_s's clips_per_video (s3d's
# accuracy is on 1, swin3d_t's on 12: a request may ask for those).
NUM_CLIPS = 5
OUTPUT = {"decoder": "classification-logits", "activation": "softmax"}
# A request brings num_clips clips at once, so batches fill without waiting.
BATCHING = {"max_batch_size": 4, "max_queue_delay_ms": 0.0}
RANDOM_LOGIT_STD = 4.0  # random weights: logits this spread, probabilities not all ~1/400
PROB_TOL = 1e-4  # max |softmax probability diff|, artifact vs eager
CHECK_FRAME_WH = (320, 240)  # generated check frames, before the model's resize


def frame_model_name(image_arch: str) -> str:
    """The single-frame baseline's default model (and CLI) name: `resnet18-frames`."""
    return f"{image_arch}-frames"


def _weights_enum(arch: str, known: tuple[str, ...], kind: str) -> type[WeightsEnum]:
    if arch not in known:
        raise ExportError(f"unknown {kind} architecture '{arch}'; known: {', '.join(known)}")
    return torchvision.models.get_model_weights(arch)


def input_spec(arch: str) -> dict:
    """model.toml's [input]: the DEFAULT weights' transforms (readable offline), for a video
    classifier or a frame classifier."""
    if arch in CLIPS:
        transforms = _weights_enum(arch, VIDEO_CLASSIFIERS, "video").DEFAULT.transforms()
        antialias = False  # VideoClassification hard-codes it
    else:
        transforms = _weights_enum(arch, FRAME_CLASSIFIERS, "frame").DEFAULT.transforms()
        antialias = bool(transforms.antialias)
    if transforms.interpolation != InterpolationMode.BILINEAR:
        raise ExportError(f"{arch}'s preset resizes with {transforms.interpolation.value}; "
                          "the worker resizes bilinearly only")
    crop = list(transforms.crop_size) * (2 if len(transforms.crop_size) == 1 else 1)
    spec: dict = {"layout": "NCHW", "color": "RGB", "scale": 1 / 255,
                  "mean": [float(v) for v in transforms.mean],
                  "std": [float(v) for v in transforms.std],
                  "resize": "center-crop", "size": [int(v) for v in crop]}
    resize = [int(v) for v in transforms.resize_size]
    if len(resize) == 2:  # (height, width): the whole frame stretched, e.g. 128 x 171
        spec["resize_to"] = resize
    else:  # the shorter side
        spec["resize_shorter"] = resize[0]
    spec["antialias"] = antialias
    return spec


def video_spec(arch: str) -> dict:
    """model.toml's [video] for a video classifier."""
    recipe = CLIPS[arch]
    return {"layout": "NCTHW", "clip_len": recipe.clip_len,
            "dynamic_clip_len": recipe.dynamic_clip_len, "min_clip_len": recipe.min_clip_len,
            "frame_rate": recipe.frame_rate, "num_clips": NUM_CLIPS}


def check_clips(arch: str, clip_len: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Generated clips (a scene panning 3 px a frame) through torchvision's own
    `weights.transforms()`. # [n, 3, clip_len, H, W] float, normalized"""
    transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    clips = []
    for i in range(n):
        rgb = np.array(make_scene(seed + i, *CHECK_FRAME_WH).image)
        frames = np.stack([np.roll(rgb, 3 * t, axis=1) for t in range(clip_len)])
        clips.append(transforms(torch.from_numpy(frames).permute(0, 3, 1, 2)))
    return torch.stack(clips)


def check_images(arch: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Generated scenes through torchvision's own `weights.transforms()`.
    # [n, 3, 224, 224] float, normalized"""
    transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    images = [torch.from_numpy(np.array(make_scene(seed + i, *CHECK_FRAME_WH).image))
              .permute(2, 0, 1) for i in range(n)]
    return transforms(torch.stack(images))


def _build(arch: str, enum: type[WeightsEnum], weights: str, seed: int,
           calibration: Callable[[], torch.Tensor]) -> tuple[nn.Module, list[str], str]:
    """The eager model, its class names and its provenance, for weights default | random |
    PATH. `calibration` makes the normalized inputs that set random weights' BatchNorm
    statistics and logit spread."""
    build = torchvision.models.get_model_builder(arch)
    labels = list(enum.DEFAULT.meta["categories"])
    if weights == "default":
        try:
            model = build(weights=enum.DEFAULT)
        except Exception as exc:  # urllib / http / hash errors all mean: no weights here
            raise ExportError(
                f"could not download the pretrained weights for {arch} ({exc}). Offline, "
                "use `--weights random` (for tests) or `--weights PATH` (a local "
                "checkpoint)") from exc
        return model.eval(), labels, f"pretrained (torchvision {enum.DEFAULT.name})"
    if weights == "random":
        torch.manual_seed(seed)
        model = build(weights=None, num_classes=len(labels))
        inputs = calibration()
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            calibrate_batchnorm(model, inputs)
        _spread_logits(model, inputs)
        return model.eval(), labels, f"random (seed {seed}; classifies nothing meaningful)"
    path = Path(weights)
    if not path.is_file():
        raise ExportError(f"--weights must be default, random or a checkpoint file; "
                          f"'{path}' is none of them")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    labels = list(state.pop("_labels", None) or labels)
    model = build(weights=None, num_classes=len(labels))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit {arch} with {len(labels)} classes: "
                          f"{exc}") from exc
    return model.eval(), labels, f"checkpoint {path.name}"


def _spread_logits(model: nn.Module, inputs: torch.Tensor, std: float = RANDOM_LOGIT_STD
                   ) -> None:
    """Scale a random model's classifier layer so its logits on `inputs` spread with `std`.
    torchvision initialises the heads small (the video ResNets' at std 0.01): every
    probability lies within ~2e-3 of 1 / classes, and a probability check sees little."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv3d)][-1]
    with torch.no_grad():
        k = std / float(model.eval()(inputs).std())
        head.weight.mul_(k)
        if head.bias is not None:
            head.bias.mul_(k)


def _short_len(arch: str) -> int:
    """A short clip the architecture takes (fast to trace and calibrate on)."""
    recipe = CLIPS[arch]
    return recipe.clip_len if not recipe.dynamic_clip_len else max(8, recipe.min_clip_len)


def build_video_classifier(arch: str, weights: str, seed: int = 0
                           ) -> tuple[nn.Module, list[str], str]:
    """The eager torchvision video classifier, its class names and its provenance."""
    enum = _weights_enum(arch, VIDEO_CLASSIFIERS, "video")
    def calibration() -> torch.Tensor:  # random weights: BatchNorm statistics of 2 clips
        return check_clips(arch, _short_len(arch), n=2, seed=seed + 100)

    return _build(arch, enum, weights, seed, calibration)


def build_frame_classifier(image_arch: str, weights: str, seed: int = 0
                           ) -> tuple[nn.Module, list[str], str]:
    """The eager torchvision image classifier, its class names and its provenance."""
    enum = _weights_enum(image_arch, FRAME_CLASSIFIERS, "frame")
    return _build(image_arch, enum, weights, seed,
                  lambda: check_images(image_arch, 8, seed + 100))


def run_artifact(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    """The written artifact (model.onnx or model.pt) on a batch. # -> logits [B, classes]"""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        (logits,) = session.run(["logits"], {name: inputs.numpy()})
        return torch.from_numpy(logits)
    with _quiet_exporters():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(inputs)


def compare(model: nn.Module, artifact: Path, inputs: torch.Tensor) -> tuple[float, float]:
    """Artifact vs eager on one batch -> (max |probability diff|, max |logit diff|)."""
    with torch.inference_mode():
        ref = model(inputs)
    got = run_artifact(artifact, inputs)
    if got.shape != ref.shape:
        raise ExportError(f"{artifact.name} gives logits {tuple(got.shape)} for input "
                          f"{tuple(inputs.shape)}; expected {tuple(ref.shape)}")
    prob = float((got.softmax(1) - ref.softmax(1)).abs().max())
    return prob, float((got - ref).abs().max())


def verify(model: nn.Module, artifact: Path, inputs: torch.Tensor) -> str:
    """compare(), raising ExportError over PROB_TOL; -> a line for the log."""
    prob, logit = compare(model, artifact, inputs)
    if prob > PROB_TOL:
        raise ExportError(f"{artifact.name} disagrees with the eager model on input "
                          f"{tuple(inputs.shape)}: max |probability diff| {prob:.1e} > "
                          f"{PROB_TOL:g} (max |logit diff| {logit:.1e})")
    return (f"{tuple(inputs.shape)}: max |probability diff| {prob:.1e}, max |logit diff| "
            f"{logit:.1e}")


def _write_artifact(model: nn.Module, out: Path, fmt: str, example: torch.Tensor,
                    input_name: str, time_axis: bool) -> str:
    """Trace `model` on `example` (batch 1) into out/model.onnx or out/model.pt; the batch
    dimension (and T where `time_axis`) stays free."""
    with torch.no_grad(), _quiet_exporters():
        if fmt == "torchscript":
            # Traced, not scripted: one graph for every architecture, none of which has
            # data-dependent control flow. check_trace off: verify() checks the artifact.
            torch.jit.trace(model, example, check_trace=False).save(str(out / "model.pt"))
            return "model.pt"
        axes = {0: "batch", 2: "time"} if time_axis else {0: "batch"}
        torch.onnx.export(
            model, (example,), str(out / "model.onnx"), dynamo=False, opset_version=17,
            input_names=[input_name], output_names=["logits"],
            dynamic_axes={input_name: axes, "logits": {0: "batch"}},
        )
    return "model.onnx"


def _check_format(fmt: str) -> None:
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"--format must be onnx or torchscript, got '{fmt}'")


def export_video_classifier(arch: str, repository: Path, *, weights: str = "default",
                            fmt: str = "onnx", name: str | None = None, seed: int = 0,
                            check: bool = True) -> Path:
    """Build, check and write `repository/name/` (model.toml, labels.txt, artifact)."""
    _check_format(fmt)
    model, labels, provenance = build_video_classifier(arch, weights, seed)
    recipe = CLIPS[arch]
    # A graph with a free T is traced at a short T and checked at clip_len, so a T baked
    # into the graph fails the check; a fixed-T graph at clip_len.
    trace_len = _short_len(arch) if recipe.dynamic_clip_len else recipe.clip_len
    name = name or arch
    with tempfile.TemporaryDirectory(dir=repository.parent if repository.exists() else None
                                     ) as tmp:
        out = Path(tmp) / name
        out.mkdir()
        example = check_clips(arch, trace_len, n=1, seed=seed + 200)
        file = _write_artifact(model, out, fmt, example, "video", recipe.dynamic_clip_len)
        if check:  # batch 2 against the traced batch 1
            log.info("checked %s against the eager model: %s", name,
                     verify(model, out / file, check_clips(arch, recipe.clip_len, seed=seed)))
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        sections = {"input": input_spec(arch), "output": OUTPUT, "video": video_spec(arch),
                    "batching": BATCHING}
        if arch in VIDEO_RESNETS:  # /explain's Grad-CAM over time: the eager module's state
            torch.save(model.state_dict(), out / "weights.pt")
            sections["explain"] = {"weights": "weights.pt", "layer": "layer4", "head": "fc"}
        write_model_toml(out / "model.toml", {
            "task": "video-classification", "backend": fmt, "file": file,
            "architecture": arch, "weights": provenance,
            "weights_kind": weights_kind(weights), "labels": "labels.txt",
            "inputs": ["video"], "outputs": ["logits"],
        }, sections)
        return move_into_place(out, repository, name)


def export_frame_classifier(image_arch: str, repository: Path, *, weights: str = "default",
                            fmt: str = "onnx", name: str | None = None, seed: int = 0,
                            check: bool = True) -> Path:
    """The single-frame baseline: an image classifier served as a video-classification
    model (`[video] layout = "frames"`). Writes `repository/name/` as the other exports."""
    _check_format(fmt)
    model, labels, provenance = build_frame_classifier(image_arch, weights, seed)
    name = name or frame_model_name(image_arch)
    with tempfile.TemporaryDirectory(dir=repository.parent if repository.exists() else None
                                     ) as tmp:
        out = Path(tmp) / name
        out.mkdir()
        example = check_images(image_arch, 1, seed + 200)
        file = _write_artifact(model, out, fmt, example, "images", time_axis=False)
        if check:
            log.info("checked %s against the eager model: %s", name,
                     verify(model, out / file, check_images(image_arch, 2, seed)))
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        write_model_toml(out / "model.toml", {
            "task": "video-classification", "backend": fmt, "file": file,
            "architecture": image_arch, "weights": provenance,
            "weights_kind": weights_kind(weights), "labels": "labels.txt",
            "inputs": ["images"], "outputs": ["logits"],
        }, {"input": input_spec(image_arch), "output": OUTPUT, "video": FRAMES,
            "batching": BATCHING})
        return move_into_place(out, repository, name)

"""The model repository: `models/{name}/model.toml` plus the artifact it names."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cvserve.app.errors import ModelNotFound

log = logging.getLogger("cvserve.repository")

TASKS = ("detection", "instance-segmentation", "semantic-segmentation", "classification",
         "video-classification", "temporal-localization")


class InputSpec(BaseModel):
    """How an image becomes the model's input tensor, written out so that a model exported
    by anyone is served as it is (no code per model).

    The order of operations: decode to upright RGB uint8 -> resize (`resize` mode) ->
    colour order -> x * scale -> (x - mean) / std -> layout -> dtype.
    """

    model_config = ConfigDict(extra="forbid")

    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1 / 255  # pixel value multiplier applied before mean/std
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    # rcnn:        torchvision's GeneralizedRCNNTransform (shorter side to min_size, longer
    #              side at most max_size, or exactly fixed_size); variable input size,
    #              batch padded to a multiple of size_divisible.
    # stretch:     resize to `size`, aspect ratio not kept.
    # letterbox:   scale by min(size / image) keeping the aspect ratio, paste at `anchor`,
    #              fill the rest with `pad_value` (YOLO).
    # center-crop: shorter side to `resize_shorter` (default: max(size)), or the whole
    #              frame to exactly `resize_to` (torchvision's video presets: 128x171),
    #              then crop `size` from the centre (ImageNet and video classifiers).
    # shorter:     shorter side to `resize_shorter`, aspect ratio kept, no crop: a variable
    #              input size (torchvision's semantic segmenters, resize_shorter = 520);
    #              only images that resize to the same size share a batch.
    resize: Literal["rcnn", "stretch", "letterbox", "center-crop", "shorter"] = "rcnn"
    size: tuple[int, int] | None = None  # (height, width) for all but rcnn and shorter
    pad_value: float = 114.0  # letterbox fill, in 0-255 pixel units (before scale)
    anchor: Literal["top-left", "center"] = "top-left"
    resize_shorter: int | None = None
    resize_to: tuple[int, int] | None = None  # center-crop: (height, width) before the crop
    # Pillow-style antialiasing when shrinking. Off matches OpenCV's INTER_LINEAR, which
    # most exporters (YOLOX, YOLOv5/v8) preprocess with; on matches torchvision's resize.
    antialias: bool = False
    # rcnn only:
    min_size: int = 800
    max_size: int = 1333
    fixed_size: tuple[int, int] | None = None  # (height, width)
    size_divisible: int = 32

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if self.resize not in ("rcnn", "shorter") and self.size is None:
            raise ValueError(f"resize = '{self.resize}' needs size = [height, width]")
        if self.resize == "shorter" and not self.resize_shorter:
            raise ValueError("resize = 'shorter' needs resize_shorter (the shorter side, px)")
        if any(v <= 0 for v in self.std):
            raise ValueError("std must be positive")
        if self.resize_to is not None:
            if self.resize != "center-crop" or self.resize_shorter is not None:
                raise ValueError("resize_to goes with resize = 'center-crop', instead of "
                                 "resize_shorter")
            if self.size and (self.resize_to[0] < self.size[0] or self.resize_to[1] < self.size[1]):
                raise ValueError(f"resize_to {self.resize_to} is smaller than the crop "
                                 f"{self.size}")
        return self


class VideoSpec(BaseModel):
    """How a video becomes the clips a video model takes (worker/video_classification.py).

    Each frame goes through `[input]` as an image would (resize, crop, colour, mean/std);
    the frames of a clip are then stacked in `layout`.
    """

    model_config = ConfigDict(extra="forbid")

    # NCTHW: [clips, 3, T, H, W] (torchvision's 3D CNNs and video transformers, I3D);
    # NTCHW: [clips, T, 3, H, W] (VideoMAE-style exports);
    # frames: an image classifier run on every sampled frame [clips * T, 3, H, W], its
    #         probabilities averaged over the clip's frames (the single-frame baseline).
    layout: Literal["NCTHW", "NTCHW", "frames"] = "NCTHW"
    clip_len: int = Field(default=16, ge=1)  # frames per clip (the model's T)
    # Whether a request may ask for another clip_len (a graph with a symbolic T; models
    # that pool over time adaptively). A fixed-T graph (MViT, I3D's ONNX) may not.
    dynamic_clip_len: bool = False
    min_clip_len: int = Field(default=1, ge=1)  # with dynamic_clip_len: the shortest T it takes
    # Default sampling: frames per second (the rate the model was trained at), or every
    # frame_stride-th frame of the file; exactly one.
    frame_rate: float | None = Field(default=15.0, gt=0)
    frame_stride: int | None = Field(default=None, ge=1)
    num_clips: int = Field(default=5, ge=1)  # default uniform clips per video
    # Localization windows: every clip_stride_s seconds (default: half a clip).
    clip_stride_s: float | None = Field(default=None, gt=0)
    # A label that means "no action" (background): never reported as a segment.
    background_label: str | None = None

    @model_validator(mode="after")
    def _check(self) -> VideoSpec:
        if self.frame_stride is not None:
            self.frame_rate = None
        if self.frame_rate is None and self.frame_stride is None:
            raise ValueError("[video] needs frame_rate (fps) or frame_stride")
        return self


DECODERS = ("torchvision-detection", "yolox", "yolov5", "yolov8", "yolov8-seg", "detr",
            "semantic-logits", "classification-logits")
_BOXES = ("torchvision-detection", "yolox", "yolov5", "yolov8", "yolov8-seg", "detr")
DECODERS_FOR = {"detection": _BOXES, "instance-segmentation": _BOXES,
                "semantic-segmentation": ("semantic-logits",),
                "classification": ("classification-logits",),
                "video-classification": ("classification-logits",),
                "temporal-localization": ("classification-logits",)}


class OutputSpec(BaseModel):
    """Which decoder turns the raw outputs into results, and its options."""

    model_config = ConfigDict(extra="forbid")

    decoder: Literal[DECODERS] = "torchvision-detection"  # type: ignore[valid-type]
    # YOLO family
    strides: list[int] = [8, 16, 32]  # yolox: the grid strides, in output order
    sigmoid: bool = False  # apply sigmoid to objectness/class outputs (raw-logit exports)
    nms_iou: float = Field(default=0.45, ge=0, le=1)
    class_agnostic_nms: bool = False
    max_candidates: int = Field(default=30_000, ge=1)  # boxes into NMS, best first
    # DETR: "softmax" over classes + a trailing no-object class (DETR), or "sigmoid" per
    # class with no no-object column (Deformable / RT-DETR). Classification: likewise,
    # or "none" for outputs that already are probabilities.
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    layout: Literal["NCHW", "NHWC"] = "NCHW"  # semantic logits
    features: str | None = None  # classification: output holding the last feature map (CAM)


class ExplainSpec(BaseModel):
    """How /explain rebuilds a classifier's eager module (gradient methods need autograd):
    the model's `architecture`, its state dict, and the layers the methods use."""

    model_config = ConfigDict(extra="forbid")

    # State dict in the model folder; None: the architecture brings its own weights.
    weights: str | None = None
    layer: str  # Grad-CAM's default layer: a dotted module path of the eager module
    head: str  # the nn.Linear after global average pooling (CAM's class weights)


class BatchingSpec(BaseModel):
    """Triton's dynamic-batching knobs (docs/design.md §3)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=1, ge=1)
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    # measured: at load, time each batch size up to max_batch_size and form batches only
    # as large as still raises throughput, waiting max_queue_delay_ms only if any does.
    # fixed: use max_batch_size and max_queue_delay_ms as written.
    policy: Literal["measured", "fixed"] = "measured"
    # Batches run at once, each on its own model thread (Triton's instance count); None:
    # measured at warm-up (1 or 2), fixed policy: 1.
    instances: int | None = Field(default=None, ge=1, le=16)
    # Batch sizes the artifact accepts when it cannot take any (one ONNX file per size);
    # the backend pads a batch up to the next one. None: any size up to max_batch_size.
    batch_sizes: list[int] | None = None
    # An ONNX graph fixed at batch 1: try making its batch dimension symbolic (used only
    # when the result matches the original graph image for image).
    symbolic_batch: bool = True

    @model_validator(mode="after")
    def _check(self) -> BatchingSpec:
        if self.batch_sizes is not None:
            if sorted(self.batch_sizes) != self.batch_sizes or self.batch_sizes[0] != 1:
                raise ValueError(f"batch_sizes must ascend from 1, got {self.batch_sizes}")
            if self.batch_sizes[-1] < self.max_batch_size:
                raise ValueError(f"max_batch_size {self.max_batch_size} exceeds the largest "
                                 f"exported batch size {self.batch_sizes[-1]}")
        return self


class Thresholds(BaseModel):
    """Per-model defaults a request may override."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(default=0.5, ge=0, le=1)
    max_detections: int = Field(default=100, ge=1)


class ModelConfig(BaseModel):
    """One model.toml. `file` may hold `{batch}` for per-batch-size artifacts."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: Literal[TASKS]  # type: ignore[valid-type]
    backend: Literal["onnx", "torchscript"]
    file: str
    architecture: str | None = None
    weights: str = "unknown"  # provenance shown in /models: pretrained, random, checkpoint
    # Which model answers a task by default: pretrained before demo before random.
    weights_kind: Literal["pretrained", "demo", "random"] = "pretrained"
    # May run in half precision on a GPU when the worker has CVSERVE_FP16 on. The exporter
    # sets it for architectures whose fp16 results are checked (tests/test_gpu_path.py).
    allow_fp16: bool = False
    labels: str | None = "labels.txt"
    # Keypoint detectors: a file of keypoint names, one per line, in output order.
    keypoints: str | None = None
    inputs: list[str] = ["images", "image_sizes"]
    outputs: list[str] = ["boxes", "scores", "labels", "counts"]
    input: InputSpec = InputSpec()
    output: OutputSpec = OutputSpec()
    video: VideoSpec | None = None  # video tasks: clip sampling and layout
    explain: ExplainSpec | None = None  # classifiers: the eager module for /explain
    batching: BatchingSpec = BatchingSpec()
    thresholds: Thresholds = Thresholds()
    path: Path = Path(".")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        decoder, resize = self.output.decoder, self.input.resize
        if decoder not in DECODERS_FOR[self.task]:
            raise ValueError(f"decoder '{decoder}' does not fit task '{self.task}' (use one "
                             f"of: {', '.join(DECODERS_FOR[self.task])})")
        if (decoder == "torchvision-detection") != (resize == "rcnn"):
            raise ValueError("resize = 'rcnn' goes with decoder 'torchvision-detection' (the "
                             f"exported torchvision core), and only with it; got resize "
                             f"'{resize}', decoder '{decoder}'")
        needs = 2 if decoder in ("yolov8-seg", "detr") else 1
        if len(self.outputs) < needs:
            raise ValueError(f"decoder '{decoder}' reads {needs} outputs; outputs = "
                             f"{self.outputs}")
        video_task = self.task in ("video-classification", "temporal-localization")
        if video_task and self.video is None:
            self.video = VideoSpec()
        if not video_task and self.video is not None:
            raise ValueError(f"[video] is for video models; this is a {self.task} model")
        shorter, size = self.input.resize_shorter, self.input.size
        if resize == "center-crop" and shorter is not None and size and shorter < max(size):
            raise ValueError(f"resize_shorter {shorter} is smaller than the crop {size}")
        return self

    def artifact(self, batch_size: int | None = None) -> Path:
        name = self.file.format(batch=batch_size) if "{batch}" in self.file else self.file
        return self.path / name

    def label_names(self) -> list[str]:
        if not self.labels:
            return []
        return (self.path / self.labels).read_text().splitlines()

    def keypoint_names(self) -> list[str]:
        if not self.keypoints:
            return []
        return (self.path / self.keypoints).read_text().splitlines()

    def artifacts_present(self) -> bool:
        sizes = self.batching.batch_sizes if "{batch}" in self.file else [None]
        return all(self.artifact(b).is_file() for b in sizes or [1])

    def describe(self) -> dict:
        """The metadata a worker announces and /models shows."""
        return {
            "name": self.name, "task": self.task, "backend": self.backend,
            "architecture": self.architecture, "weights": self.weights,
            "weights_kind": self.weights_kind, "allow_fp16": self.allow_fp16,
            "labels": self.label_names(),
            "input": self.input.model_dump(mode="json"),
            "output": self.output.model_dump(mode="json"),
            "batching": self.batching.model_dump(mode="json"),
            **({"video": self.video.model_dump(mode="json")} if self.video else {}),
            **({"explain": self.explain.model_dump(mode="json")} if self.explain else {}),
            "thresholds": self.thresholds.model_dump(mode="json"),
        }


def load_config(model_dir: Path) -> ModelConfig:
    toml_path = model_dir / "model.toml"
    try:
        data = tomllib.loads(toml_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{toml_path}: {exc}") from exc
    data.setdefault("name", model_dir.name)
    try:
        return ModelConfig(path=model_dir, **data)
    except ValidationError as exc:
        raise ValueError(f"{toml_path}: {exc}") from exc


class ModelRepository:
    """The folders under one root that hold a model.toml."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "model.toml").is_file())

    def get(self, name: str) -> ModelConfig:
        if name not in self.names():
            raise ModelNotFound(f"no model '{name}' in {self.root} (have: "
                                f"{', '.join(self.names()) or 'none'})")
        return load_config(self.root / name)

    def configs(self) -> list[ModelConfig]:
        """Every loadable model; a broken model.toml is logged and skipped."""
        out = []
        for name in self.names():
            try:
                cfg = load_config(self.root / name)
            except ValueError as exc:
                log.error("skipping model %s: %s", name, exc)
                continue
            if not cfg.artifacts_present():
                log.warning("skipping model %s: artifact %s not built (run `cvserve models "
                            "export %s`)", name, cfg.file, cfg.architecture or name)
                continue
            out.append(cfg)
        return out

"""The model repository: `models/{name}/model.toml` plus the artifact it names."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from cvserve.app.errors import ModelNotFound

log = logging.getLogger("cvserve.repository")

TASKS = ("detection", "instance-segmentation", "semantic-segmentation", "classification",
         "video-classification", "temporal-localization")


class InputSpec(BaseModel):
    """How an image becomes the model's input tensor."""

    color: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1 / 255  # pixel value multiplier applied before mean/std
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # "rcnn": torchvision's GeneralizedRCNNTransform (shorter side to min_size, longer side
    # at most max_size, or exactly fixed_size), batch padded to a multiple of size_divisible.
    resize: Literal["rcnn"] = "rcnn"
    min_size: int = 800
    max_size: int = 1333
    fixed_size: tuple[int, int] | None = None  # (height, width)
    size_divisible: int = 32


class BatchingSpec(BaseModel):
    """Triton's dynamic-batching knobs (docs/design.md §3)."""

    max_batch_size: int = Field(default=1, ge=1)
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    # Batch sizes the artifact accepts when it cannot take any (one ONNX file per size);
    # the backend pads a batch up to the next one. None: any size up to max_batch_size.
    batch_sizes: list[int] | None = None

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
    score_threshold: float = Field(default=0.5, ge=0, le=1)
    max_detections: int = Field(default=100, ge=1)


class ModelConfig(BaseModel):
    """One model.toml. `file` may hold `{batch}` for per-batch-size artifacts."""

    name: str
    task: Literal[TASKS]  # type: ignore[valid-type]
    backend: Literal["onnx", "torchscript"]
    file: str
    decoder: Literal["torchvision-detection"] = "torchvision-detection"
    architecture: str | None = None
    weights: str = "unknown"  # provenance shown in /models: pretrained, random, checkpoint
    labels: str | None = "labels.txt"
    inputs: list[str] = ["images", "image_sizes"]
    outputs: list[str] = ["boxes", "scores", "labels", "counts"]
    input: InputSpec = InputSpec()
    batching: BatchingSpec = BatchingSpec()
    thresholds: Thresholds = Thresholds()
    path: Path = Path(".")

    def artifact(self, batch_size: int | None = None) -> Path:
        name = self.file.format(batch=batch_size) if "{batch}" in self.file else self.file
        return self.path / name

    def label_names(self) -> list[str]:
        if not self.labels:
            return []
        return (self.path / self.labels).read_text().splitlines()

    def artifacts_present(self) -> bool:
        sizes = self.batching.batch_sizes if "{batch}" in self.file else [None]
        return all(self.artifact(b).is_file() for b in sizes or [1])

    def describe(self) -> dict:
        """The metadata a worker announces and /models shows."""
        return {
            "name": self.name, "task": self.task, "backend": self.backend,
            "architecture": self.architecture, "weights": self.weights,
            "labels": self.label_names(),
            "input": self.input.model_dump(mode="json"),
            "batching": self.batching.model_dump(mode="json"),
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

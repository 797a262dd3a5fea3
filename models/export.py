"""`cvserve models export`: torchvision detector -> checked artifact + model.toml.

Detectors include Mask R-CNN (task instance-segmentation: the core adds unpasted masks)
and Keypoint R-CNN (task detection: the core adds keypoints); models/detector_core.py
lists each core's outputs. Semantic segmenters: models/segment_export.py.

Weights: `default` (torchvision's pretrained, downloaded), `random` (offline tests), or a
local checkpoint PATH. Formats (docs/design.md §4):

- torchscript: one `model.pt`, scripted, taking a batch of any size.
- onnx: tracing unrolls the detector's per-image loops, so a graph takes a fixed number of
  images. We export one graph per batch size (`model.b{batch}.onnx`, 1/2/4 by default) and
  the backend pads a batch up to the next size. Cost: the weights are stored once per size.

Before anything is written, the artifact runs through the worker's own serving pipeline
on generated images and must match the eager model (IoU >= 0.99, |score diff| <= 1e-3).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.ops import box_iou

from .detector_core import KeypointRCNNCore, MaskRCNNCore, detector_core
from .synthetic import make_scene
from .tiny import tiny_fasterrcnn, tiny_maskrcnn

log = logging.getLogger("cvserve.export")

DETECTORS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "ssdlite320_mobilenet_v3_large",
    "ssd300_vgg16",
    "fcos_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "keypointrcnn_resnet50_fpn",
)
DEFAULT_DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"
DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo" / "detector.pt"
DEMO_MASK_WEIGHTS = DEMO_WEIGHTS.with_name("masks.pt")  # tiny_maskrcnn, the demo segmenter
# Cores whose fp16 results tests/test_gpu_path.py checks against fp32 (`allow_fp16` in
# model.toml; the worker uses it only with CVSERVE_FP16 on a GPU); add others once checked.
# Not the FPN Faster R-CNNs: their RoI pooler picks each box's FPN level from its area
# computed in the boxes' dtype, which overflows fp16 (max 65504) for boxes over 256x256 px,
# so large objects would be pooled from the wrong level.
FP16_SAFE = ("tiny_fasterrcnn",)
# Measured (../shared/PERF.md): the R-CNN family runs ~2x faster per image in batches of
# 2-4 on 2 CPU cores, so these wait a little for a batch to fill.
BATCHING = {"max_batch_size": 4, "max_queue_delay_ms": 5.0}
# Keypoint R-CNN's classes: COCO persons only. Its weights' meta names class 0 "no person";
# the other label files call it "__background__".
PERSON_LABELS = ["__background__", "person"]


class ExportError(Exception):
    """An export that cannot proceed; the message says what to do instead."""


def _builder(arch: str) -> Callable[..., nn.Module]:
    if arch == "tiny_fasterrcnn":
        return tiny_fasterrcnn
    if arch == "tiny_maskrcnn":
        return tiny_maskrcnn
    if arch not in DETECTORS:
        from .segment_export import SEGMENTERS  # imports this module: imported when needed
        from .video_export import FRAME_CLASSIFIERS, VIDEO_CLASSIFIERS, frame_model_name

        raise ExportError(f"unknown architecture '{arch}'; known detectors: "
                          f"{', '.join((*DETECTORS, 'tiny_fasterrcnn', 'tiny_maskrcnn'))}; "
                          f"semantic "
                          f"segmenters: {', '.join(SEGMENTERS)}; video classifiers: "
                          f"{', '.join(VIDEO_CLASSIFIERS)}; frame-level video models: "
                          f"{', '.join(map(frame_model_name, FRAME_CLASSIFIERS))}")
    return getattr(torchvision.models.detection, arch)


def _score_kwargs(arch: str, floor: float) -> dict[str, float]:
    two_stage = arch.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn"))
    return {"box_score_thresh": floor} if two_stage else {"score_thresh": floor}


def _size_kwargs(arch: str, min_size: int | None, max_size: int | None) -> dict[str, int]:
    """GeneralizedRCNNTransform's resize limits; max_size defaults to torchvision's
    1333/800 of min_size."""
    if min_size is None and max_size is None:
        return {}
    if arch.startswith("ssd"):
        raise ExportError(f"{arch} takes a fixed input size; min_size/max_size apply to the "
                          "R-CNN family, RetinaNet and FCOS only")
    min_size = min_size or 800
    return {"min_size": min_size, "max_size": max_size or round(min_size * 1333 / 800)}


def scene_batch(seed: int, n: int = 8, size: int = 320) -> torch.Tensor:
    """Generated scenes as a batch. # [n, 3, size, size] float in [0, 1]"""
    scenes = [make_scene(seed + i, size, size) for i in range(n)]
    return torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1)
                        for s in scenes]).float() / 255


def calibrate_batchnorm(module: nn.Module, images: torch.Tensor) -> None:
    """Random weights leave BatchNorm's running statistics at mean 0 / var 1, and the
    features vanish layer by layer (std ~1e-8 at a ResNet-50's FPN). One forward pass
    over generated images with only the BatchNorm layers in train mode sets each layer's
    statistics to those of its real input (a cumulative average: momentum None), so
    outputs are not degenerate. Other layers stay in eval mode (dropout off)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    module.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        module(images)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    module.eval()


def _calibrate_batchnorm(model: nn.Module, seed: int) -> None:
    """calibrate_batchnorm for a detector: its backbone, on generated scenes resized and
    normalized as the detector's transform does."""
    with torch.no_grad():
        images, _ = model.eval().transform(list(scene_batch(seed)))
    calibrate_batchnorm(model.backbone, images.tensors)


def build_eager(arch: str, weights: str, num_classes: int | None = None,
                score_floor: float | None = None, seed: int = 0, min_size: int | None = None,
                max_size: int | None = None, detections_per_img: int | None = None
                ) -> tuple[nn.Module, list[str]]:
    """The eager torchvision model and its label names (index = class id)."""
    build = _builder(arch)
    kwargs: dict = _size_kwargs(arch, min_size, max_size)
    if score_floor is not None:
        kwargs.update(_score_kwargs(arch, score_floor))
    if detections_per_img is not None:  # K, the most detections the core returns
        two_stage = arch.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn"))
        kwargs["box_detections_per_img" if two_stage else "detections_per_img"] = \
            detections_per_img
    if weights == "default":
        try:
            model = build(weights="DEFAULT", **kwargs)
        except Exception as exc:  # urllib / http / hash errors all mean: no weights here
            raise ExportError(
                f"could not download the pretrained weights for {arch} ({exc}). Offline, "
                "use `--weights random` (for tests) or `--weights PATH` (a local "
                "checkpoint)") from exc
        labels = list(torchvision.models.get_model_weights(arch).DEFAULT.meta["categories"])
        return model.eval(), PERSON_LABELS if _is_keypoint(arch) else labels
    default_classes = len(PERSON_LABELS) if _is_keypoint(arch) else 91
    if weights == "random":
        torch.manual_seed(seed)
        num_classes = num_classes or default_classes
        model = build(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        _calibrate_batchnorm(model, seed)
        return model.eval(), _default_labels(arch, num_classes)
    path = Path(weights)
    if not path.is_file():
        raise ExportError(f"--weights must be default, random or a checkpoint file; "
                          f"'{weights}' is none of them")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    labels = state.pop("_labels", None) if isinstance(state, dict) else None
    if num_classes is None:
        num_classes = len(labels) if labels else default_classes
    model = build(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"{path} does not fit {arch} with {num_classes} classes: {exc}") from exc
    return model.eval(), list(labels) if labels else _default_labels(arch, num_classes)


def _is_keypoint(arch: str) -> bool:
    return arch.startswith("keypointrcnn")


def _default_labels(arch: str, num_classes: int) -> list[str]:
    """Label names for weights that carry none: COCO's, or Keypoint R-CNN's persons."""
    if _is_keypoint(arch) and num_classes == len(PERSON_LABELS):
        return PERSON_LABELS
    coco = list(torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT
                .meta["categories"])
    if num_classes == len(coco):
        return coco
    return ["__background__", *(f"class_{i}" for i in range(1, num_classes))]


def keypoint_names() -> list[str]:
    """COCO's 17 person keypoints, in Keypoint R-CNN's output order (offline: weights meta)."""
    weights = torchvision.models.detection.KeypointRCNN_ResNet50_FPN_Weights.DEFAULT
    return list(weights.meta["keypoint_names"])


def _input_spec(model: nn.Module) -> dict:
    t = model.transform
    spec = {"min_size": int(t.min_size[-1]), "max_size": int(t.max_size),
            "mean": [float(v) for v in t.image_mean], "std": [float(v) for v in t.image_std],
            "size_divisible": int(t.size_divisible)}
    if t.fixed_size is not None:
        spec["fixed_size"] = [int(t.fixed_size[1]), int(t.fixed_size[0])]  # (h, w)
    return spec


def weights_kind(weights: str) -> str:
    """pretrained | demo | random, for the choice of a task's default model."""
    if weights == "random":
        return "random"
    if weights != "default" and Path(weights).resolve() in (DEMO_WEIGHTS.resolve(),
                                                            DEMO_MASK_WEIGHTS.resolve()):
        return "demo"
    return "pretrained"


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def write_model_toml(path: Path, top: dict, sections: dict[str, dict]) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in sections.items():
        lines += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")


def check_images(n: int = 3) -> list[bytes]:
    """Generated scenes of different sizes, JPEG-encoded: real decode, real resize."""
    sizes = [(480, 360), (300, 420), (640, 427), (256, 256)]
    return [make_scene(100 + i, *sizes[i % len(sizes)]).jpeg() for i in range(n)]


def decisive(ref: dict[str, torch.Tensor], score_tol: float = 1e-3,
             overlap: float = 0.3, min_side_px: float = 2.0) -> list[int]:
    """Indices of detections that float noise cannot remove. Not decisive: a detection that
    another overlaps (IoU > overlap) with a score within score_tol, whatever its class
    (NMS or a top-k may keep either); one within score_tol of a full top-K list's cut;
    and a box under min_side_px on a side (JSON's 0.01 px rounding alone moves its IoU).
    Trained models have few of these; random weights have many."""
    scores, n = ref["scores"], len(ref["scores"])
    if n == 0:
        return []
    ious = box_iou(ref["boxes"], ref["boxes"])
    close = (scores[:, None] - scores[None, :]).abs() <= score_tol
    rivals = (ious > overlap) & close
    rivals.fill_diagonal_(False)
    sides = torch.minimum(ref["boxes"][:, 2] - ref["boxes"][:, 0],
                          ref["boxes"][:, 3] - ref["boxes"][:, 1])
    cut = float(scores.min()) + score_tol if n >= 100 else -1.0
    return [i for i in range(n)
            if not rivals[i].any() and float(scores[i]) > cut and float(sides[i]) >= min_side_px]


def match_detections(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                     iou: float = 0.99, score_tol: float = 1e-3) -> tuple[int, int]:
    """How many of `ref`'s decisive detections `got` reproduces (same label, IoU >= iou,
    |score diff| <= score_tol). -> (matched, decisive)"""
    indices = decisive(ref, score_tol)
    if not indices or len(got["boxes"]) == 0:
        return 0, len(indices)
    ious = box_iou(ref["boxes"], got["boxes"])
    matched = 0
    for i in indices:
        ok = ((ious[i] >= iou) & (got["labels"] == ref["labels"][i])
              & ((got["scores"] - ref["scores"][i]).abs() <= score_tol))
        matched += bool(ok.any())
    return matched, len(indices)


def _serve(model_dir: Path, images: list[bytes], batched: bool) -> list[dict[str, torch.Tensor]]:
    """Run images through the worker's serving pipeline (decode ... postprocess)."""
    from cvserve.app.queue import Job
    from cvserve.app.settings import Settings
    from cvserve.worker.backend import load_backend
    from cvserve.worker.detection import DetectionTask
    from cvserve.worker.repository import load_config

    # The detection stages for every torchvision core, Mask and Keypoint R-CNN included:
    # they read the boxes, scores, labels and counts outputs and leave any others alone.
    cfg, settings = load_config(model_dir), Settings(device="cpu")
    task = DetectionTask(cfg, load_backend(cfg, settings), settings)
    items = [task.prepare(Job(model="check", task="detection", payload=data, deadline_ms=0,
                              params={"score_threshold": 0.0, "max_detections": 1000}))
             for data in images]
    if batched:  # batched as the worker batches: jobs whose batch keys are equal
        by_key: dict[Hashable, list] = {}
        for item in items:
            by_key.setdefault(task.batch_key(item), []).append(item)
        groups = list(by_key.values())
    else:
        groups = [[item] for item in items]
    served: dict[int, dict] = {}
    for group in groups:
        for item, output in zip(group, task.run(group), strict=True):
            served[id(item)] = task.finish(item, output)[0]
    outs = []
    for item in items:
        dets = served[id(item)]["detections"]
        outs.append({
            "boxes": torch.tensor([[d["box"][k] for k in ("x1", "y1", "x2", "y2")]
                                   for d in dets]).reshape(-1, 4),
            "scores": torch.tensor([d["score"] for d in dets]),
            "labels": torch.tensor([d["class_id"] for d in dets], dtype=torch.int64)})
    return outs


def eager_detections(model: nn.Module, images: list[bytes]) -> list[dict[str, torch.Tensor]]:
    """The eager torchvision model on each decoded image alone (the reference)."""
    from cvserve.worker.imaging import decode_rgb

    outs = []
    with torch.no_grad():
        for data in images:
            img, _ = decode_rgb(data, 10**9)
            outs.append(model([img.float() / 255])[0])
    return outs


def verify(model: nn.Module, model_dir: Path) -> str:
    """Served (alone and batched) vs eager on generated images; raises on a mismatch."""
    images = check_images()
    ref = eager_detections(model, images)
    report = []
    for batched in (False, True):
        for i, (r, g) in enumerate(zip(ref, _serve(model_dir, images, batched), strict=True)):
            matched, decisive = match_detections(r, g)
            if matched < decisive:
                raise ExportError(f"exported model disagrees with the eager model on check "
                                  f"image {i} ({'batched' if batched else 'alone'}): "
                                  f"{matched} of {decisive} detections reproduced")
            report.append(f"{matched}/{decisive}")
    return " ".join(report)


def export_detector(arch: str, repository: Path, *, weights: str = "default",
                    fmt: str = "torchscript", name: str | None = None,
                    batch_sizes: tuple[int, ...] = (1, 2, 4), num_classes: int | None = None,
                    score_floor: float | None = None, seed: int = 0,
                    min_size: int | None = None, max_size: int | None = None,
                    detections_per_img: int | None = None, check: bool = True) -> Path:
    """Build, check and write `repository/name/` (model.toml, labels.txt, artifact).
    min_size/max_size override the detector's resize limits (smaller: faster);
    detections_per_img the most detections per image (Mask R-CNN's mask head and Keypoint
    R-CNN's keypoint head run once per detection)."""
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"--format must be onnx or torchscript, got '{fmt}'")
    if score_floor is None and weights == "random":
        score_floor = 0.0  # untrained scores sit near 1/num_classes, under torchvision's 0.05
    model, labels = build_eager(arch, weights, num_classes, score_floor, seed, min_size,
                                max_size, detections_per_img)
    core = detector_core(model)
    name = name or arch
    max_batch = min(BATCHING["max_batch_size"], max(batch_sizes))
    with tempfile.TemporaryDirectory(dir=repository.parent if repository.exists() else None
                                     ) as tmp:
        out = Path(tmp) / name
        out.mkdir()
        if fmt == "torchscript":
            script_core(model).save(str(out / "model.pt"))
            file, sizes = "model.pt", None
        else:
            export_onnx(model, out, batch_sizes)
            file, sizes = "model.b{batch}.onnx", list(batch_sizes)
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        extra: dict = {}
        if isinstance(core, KeypointRCNNCore):
            (out / "keypoints.txt").write_text("\n".join(keypoint_names()) + "\n")
            extra["keypoints"] = "keypoints.txt"
        provenance = {"default": "pretrained (torchvision DEFAULT)",
                      "random": f"random (seed {seed}; detects nothing meaningful)"}
        batching = {"max_batch_size": max_batch,
                    "max_queue_delay_ms": BATCHING["max_queue_delay_ms"]}
        if sizes:
            batching["batch_sizes"] = sizes
        task = "instance-segmentation" if isinstance(core, MaskRCNNCore) else "detection"
        write_model_toml(out / "model.toml", {
            "task": task, "backend": fmt, "file": file,
            "architecture": arch,
            "weights": provenance.get(weights, f"checkpoint {Path(weights).name}"),
            "weights_kind": weights_kind(weights),
            "labels": "labels.txt", **extra,
            "outputs": list(core.OUTPUTS),
            "allow_fp16": arch in FP16_SAFE,
        }, {"input": _input_spec(model), "batching": batching,
            "thresholds": {"score_threshold": 0.5,
                           "max_detections": 100}})
        if check:
            log.info("checked %s against the eager model: %s", name, verify(model, out))
        return move_into_place(out, repository, name)


def export_scripted(repository: Path, name: str, module: nn.Module,
                    verify: Callable[[Path], str], labels: list[str] | tuple[str, ...],
                    top: dict, sections: dict[str, dict], state: dict | None = None) -> Path:
    """A scripted model's folder (the demo classifier's and U-Net's): `module` scripted to
    model.pt and checked by `verify` (raises ExportError; returns what it measured),
    labels.txt, model.toml (`top` and `sections`) and, given a `state` dict, weights.pt
    (/explain's eager module); built beside the repository, then moved into place."""
    repository = Path(repository)
    with tempfile.TemporaryDirectory(dir=repository.parent if repository.exists() else None
                                     ) as tmp:
        out = Path(tmp) / name
        out.mkdir()
        with _quiet_exporters():
            torch.jit.script(module.eval()).save(str(out / "model.pt"))
        log.info("checked %s against the eager model: %s", name, verify(out / "model.pt"))
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        if state is not None:
            torch.save(state, out / "weights.pt")
        write_model_toml(out / "model.toml", top, sections)
        return move_into_place(out, repository, name)


def move_into_place(built: Path, repository: Path, name: str) -> Path:
    """A model folder built (and checked) elsewhere becomes `repository/name`, replacing
    any older one: a half-built model never appears there."""
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / name
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(built), str(target))
    return target


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """torch.jit.script and the tracing ONNX exporter are deprecated upstream, yet they are
    the two exporters that handle torchvision detectors (a list of any length; dynamic
    image sizes through data-dependent NMS, which torch.export cannot trace yet). Their
    deprecation and tracer warnings say nothing actionable to a user, so they are muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def script_core(model: nn.Module) -> torch.jit.ScriptModule:
    """The model's core (models/detector_core.py), scripted: any batch size."""
    with _quiet_exporters():
        return torch.jit.script(detector_core(model))


def trace_inputs(model: nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The example an ONNX graph is traced on: `batch` noise images at the model's input
    size, seeded so that an export (and a test of it) is repeatable.
    -> images [B, 3, H, W], image_sizes [B, 2]"""
    spec = _input_spec(model)
    h, w = spec.get("fixed_size", [spec["min_size"], spec["min_size"]])
    images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(batch))
    return images, torch.tensor([[h, w]] * batch, dtype=torch.int64)


def export_onnx(model: nn.Module, out: Path, batch_sizes: tuple[int, ...]) -> None:
    """Trace the model's core into `out/model.b{batch}.onnx`, one graph per batch size."""
    core = detector_core(model, traced=True)
    for b in batch_sizes:
        with torch.no_grad(), _quiet_exporters():
            torch.onnx.export(
                core, trace_inputs(model, b), str(out / f"model.b{b}.onnx"), dynamo=False,
                opset_version=17, input_names=["images", "image_sizes"],
                output_names=list(core.OUTPUTS),
                dynamic_axes={"images": {2: "height", 3: "width"}},
            )

"""Train a torchvision detector on the synthetic world (models/synthetic.py), on the CPU.

The checkpoint it writes (`state_dict` plus `_labels`) is what `cvserve models export
ARCH --weights PATH` takes, so the demo models load through the same path as anyone's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from .export import _builder
from .synthetic import CLASSES, make_scene

log = logging.getLogger("cvserve.train")


def _sample(seed: int, masks: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scene = make_scene(seed)  # varied sizes and aspect ratios; the model's transform resizes
    image = torch.from_numpy(np.asarray(scene.image).copy()).permute(2, 0, 1).float() / 255
    boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([o.class_id for o in scene.objects], dtype=torch.int64)
    target = {"boxes": boxes, "labels": labels}
    if masks:  # the visible part of each object, as the ground truth's boxes are
        target["masks"] = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
    return image, target


def train_detector(arch: str, out: Path, *, steps: int = 300, batch_size: int = 8,
                   lr: float = 0.02, seed: int = 0, init: Path | None = None) -> Path:
    """Train from random weights, or from `init` (a checkpoint of this function's: the
    parameters it has of `arch` are loaded, the others stay random); returns the
    checkpoint path."""
    torch.manual_seed(seed)
    labels = ["__background__", *CLASSES]
    model = _builder(arch)(weights=None, weights_backbone=None, num_classes=len(labels))
    if init is not None:
        state = torch.load(init, map_location="cpu", weights_only=True)["model"]
        state.pop("_labels", None)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{init} has parameters {arch} lacks: {result.unexpected_keys}")
        log.info("started from %s; new: %s", init,
                 sorted({k.rsplit(".", 2)[0] for k in result.missing_keys}))
    masks = isinstance(model, MaskRCNN)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = [_sample(seed * 1_000_003 + step * batch_size + i, masks)
                 for i in range(batch_size)]
        losses = model([b[0] for b in batch], [b[1] for b in batch])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f (%.0f s)", step + 1, steps, loss.item(),
                     time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    torch.save({"model": {**state, "_labels": labels}}, out)
    return out


def write_box_parts(ckpt: Path, out: Path, arch: str = "tiny_fasterrcnn") -> Path:
    """Write the parameters of `ckpt` that detector `arch` has (a Mask R-CNN checkpoint
    without its mask branch) as a checkpoint of `arch`: multi-task training of the shared
    parts on masks as well as boxes left them better at boxes than box training alone."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    labels = state.pop("_labels")
    model = _builder(arch)(weights=None, weights_backbone=None, num_classes=len(labels))
    wanted = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in state.items() if k in wanted})  # strict
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {**model.state_dict(), "_labels": labels}}, out)
    return out

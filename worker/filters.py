"""GET /models/{name}/filters.png: a model's first-layer filters as an image grid.

Read from the served artifact itself, so every model has one, whatever its task: the
weight of the first convolution in the ONNX graph (its nodes are in topological order),
or the first 4-D / 5-D parameter of a TorchScript module (registration order: the stem
convolution of torchvision's models). Each filter is scaled to [0, 1] on its own.

    2-D filters [O, 3, k, k]:      one RGB tile per filter, 8 to a row
    2-D, other channel counts:     one grey tile per filter (the mean over its channels)
    3-D filters [O, C, t, k, k]:   one row per filter, its t frames left to right
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import make_grid

from .imaging import encode_png
from .task import Task

MAX_FILTERS = 64
TILE_PX = 48  # each filter drawn about this large (nearest-neighbour, whole multiples)


def first_layer_weights(task: Task) -> np.ndarray:
    """The first convolution's weight of the served artifact: [O, I, kh, kw] or
    [O, I, t, kh, kw]. ValueError when the artifact has none."""
    cfg = task.cfg
    if cfg.backend == "onnx":
        import onnx
        from onnx import numpy_helper

        sizes = task.backend.batch_sizes
        graph = onnx.load(str(cfg.artifact(sizes[0] if sizes else None))).graph
        constants = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                constants.update({out: a.t for a in node.attribute if a.name == "value"
                                  for out in node.output})
            if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in constants:
                return numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
        raise ValueError(f"{cfg.name}: no convolution with constant weights in its graph")
    module = task.backend.module  # type: ignore[attr-defined]
    for _name, param in module.named_parameters():
        if param.ndim in (4, 5):
            return param.detach().float().cpu().numpy()
    raise ValueError(f"{cfg.name}: no convolution weights among its parameters")


def filters_png(weights: np.ndarray, bgr: bool = False) -> bytes:
    """# [O, I, kh, kw] or [O, I, t, kh, kw] -> PNG of the grid (the first 64 filters).
    `bgr`: the model takes BGR, so its first input channel is blue."""
    w = torch.from_numpy(np.asarray(weights, dtype=np.float32))[:MAX_FILTERS]
    if w.ndim not in (4, 5):
        raise ValueError(f"filters of shape {tuple(w.shape)}: expected 4 or 5 dimensions")
    if bgr and w.shape[1] == 3:
        w = w.flip(1)
    lo = w.flatten(1).min(dim=1).values.view(-1, *[1] * (w.ndim - 1))
    hi = w.flatten(1).max(dim=1).values.view(-1, *[1] * (w.ndim - 1))
    w = (w - lo) / (hi - lo).clamp(min=1e-12)
    if w.ndim == 5:  # [O, I, t, kh, kw] -> a tile per (filter, frame), a row per filter
        frames = w.shape[2]
        tiles = w.permute(0, 2, 1, 3, 4).reshape(-1, *w.shape[1:2], *w.shape[3:])
        nrow = frames
    else:
        tiles, nrow = w, 8
    if tiles.shape[1] != 3:
        tiles = tiles.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    k = max(tiles.shape[-2:])
    scale = max(1, TILE_PX // k)
    tiles = tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    grid = make_grid(tiles, nrow=nrow, padding=2, pad_value=1.0)
    return encode_png((grid * 255).round().clamp(0, 255).to(torch.uint8))


def render_filters(task: Task) -> bytes:
    return filters_png(first_layer_weights(task), bgr=task.cfg.input.color == "BGR")

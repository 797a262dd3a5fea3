"""/explain for image classifiers: what in the image made the model say what it said.

    open:     decode -> preprocess (model.toml) -> plan the job's items   (thread pool)
    advance:  item 0 is the image; occlusion adds one copy per patch position
    run:      a batch of one kind: forward (artifact: cam, occlusion) or one gradient
              method at one layer (eager module)                          (model thread)
    finish:   target, top-k, heatmap grid in [0, 1]; or a PNG over the image (thread pool)

Forward-only methods run on the served artifact (ONNX or TorchScript), so an occlusion's
many copies batch like any other requests' images. Gradient methods run on the eager
module rebuilt from model.toml's [explain] (models/classifiers.py), batched with other
requests of the same method and layer. Method formulas: worker/explain_methods.py.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import cv2
import numpy as np
import torch

from cvserve.app.errors import InputError
from cvserve.app.queue import Job

from . import explain_methods as em
from .imaging import decode_rgb, encode_png
from .preprocess import Geometry, preprocess
from .task import Prepared, Stream, StreamingTask

log = logging.getLogger("cvserve.explain")

METHODS = ("gradcam", "gradcam++", "cam", "saliency", "guided-backprop", "guided-gradcam",
           "occlusion")
GRADIENT = ("gradcam", "gradcam++", "saliency", "guided-backprop", "guided-gradcam")
LAYERED = ("gradcam", "gradcam++", "guided-gradcam")
MAX_GRID = 64  # a JSON heatmap has at most this many cells a side (area-averaged down)


class ExplainTask(StreamingTask):
    """Serves `classification` models: /explain's methods, and their top-k classes."""

    def __init__(self, cfg: Any, backend: Any, settings: Any) -> None:
        super().__init__(cfg, backend, settings)
        self.explainer: em.Explainer | None = None
        self.why_no_eager = "model.toml has no [explain] section"
        if cfg.explain is not None:
            from cvserve.models.classifiers import build_eager

            try:
                net = build_eager(cfg.architecture, cfg.path, cfg.explain.weights,
                                  len(self.labels))
                self.explainer = em.Explainer(net, backend.device, cfg.explain.head,
                                              cfg.explain.layer)
            except (ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
                self.why_no_eager = f"its eager module could not be built: {exc}"
                log.error("%s: gradient methods unavailable: %s", cfg.name, self.why_no_eager)
        self.features = cfg.output.features
        if self.features is not None and self.features not in cfg.outputs:
            raise ValueError(f"[output] features = '{self.features}' is not one of outputs "
                             f"{cfg.outputs}")

    def methods(self) -> list[str]:
        """What this model can answer (forward-only ones need no eager module; CAM needs
        the feature map output and the head's weights)."""
        have = ["occlusion"]
        if self.explainer is not None:
            have += list(GRADIENT)
            if self.features is not None:
                have.append("cam")
        return [m for m in METHODS if m in have]

    # --- open / advance: the job's items -------------------------------------------------
    def open(self, job: Job) -> Stream:
        p = job.params
        method = p.get("method") or "gradcam"
        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}; got '{method}'")
        if method not in self.methods():
            why = (self.why_no_eager if method != "cam" or self.explainer is None else
                   "the artifact has no feature-map output ([output] features)")
            raise InputError(f"model {self.cfg.name} cannot answer method={method}: {why}; "
                             f"it can: {', '.join(self.methods())}")
        layer = None
        if method in LAYERED:
            assert self.explainer is not None
            layer = p.get("layer") or self.explainer.layer
            try:
                em.module_at(self.explainer.net, layer)
            except KeyError as exc:
                raise InputError(f"model {self.cfg.name}: {exc.args[0]}") from exc
        elif p.get("layer"):
            raise InputError(f"layer applies to {', '.join(LAYERED)}, not {method}")
        target = em.parse_target(p.get("target"), self.labels, self.cfg.name)
        image, info = decode_rgb(job.payload, self.settings.image_pixels)
        x, geometry = preprocess(image, self.cfg.input)
        total = 1
        plan: dict[str, Any] = {}
        if method == "occlusion":
            plan = self._occlusion_plan(x, p)
            total += len(plan["positions"])
        keep = image if p.get("render") in ("overlay", "heatmap") else None
        return Stream(job, total, {"x": x, "geometry": geometry, "method": method,
                                   "layer": layer, "target": target, "image": keep,
                                   "size": (info.width, info.height), **plan})

    def _occlusion_plan(self, x: np.ndarray, p: dict[str, Any]) -> dict[str, Any]:
        """Patch positions over the model input, filled with zeros of the normalized
        input (the dataset's mean colour)."""
        return em.occlusion_plan(*self._hw(x), p, "the model input")

    def _hw(self, x: np.ndarray) -> tuple[int, int]:
        return (x.shape[0], x.shape[1]) if self.cfg.input.layout == "NHWC" else x.shape[1:3]

    def advance(self, stream: Stream) -> Prepared:
        index = stream.produced
        stream.produced += 1
        meta = stream.meta
        x = meta["x"]
        if index > 0:  # an occluded copy
            y, xx = meta["positions"][index - 1]
            patch = meta["patch"]
            x = x.copy()
            if self.cfg.input.layout == "NHWC":
                x[y:y + patch, xx:xx + patch, :] = 0
            else:
                x[:, y:y + patch, xx:xx + patch] = 0
        kind = meta["method"] if meta["method"] in GRADIENT else "forward"
        return Prepared(stream.job, x, {"kind": kind, "layer": meta["layer"],
                                        "target": meta["target"]},
                        stream=stream, index=index)

    def batch_key(self, item: Prepared) -> Hashable:
        """Forward items batch with any forward items; a gradient method's with the same
        method at the same layer."""
        return item.meta["kind"], item.meta["layer"], item.inputs.shape

    # --- run ------------------------------------------------------------------------------
    def run(self, batch: list[Prepared]) -> list[dict[str, np.ndarray]]:
        kind, layer = batch[0].meta["kind"], batch[0].meta["layer"]
        inputs = np.stack([item.inputs for item in batch])
        if kind == "forward":
            out = self.backend.run({self.cfg.inputs[0]: inputs})
            logits = out[self.cfg.outputs[0]]
            features = out[self.features] if self.features else None
            return [{"logits": logits[i],
                     **({"features": features[i]} if features is not None else {})}
                    for i in range(len(batch))]
        assert self.explainer is not None
        x = torch.from_numpy(inputs)
        if self.cfg.input.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        maps, logits, chosen = self.explainer.run(
            kind, x, [item.meta["target"] for item in batch], layer or self.explainer.layer)
        maps, logits = maps.float().cpu().numpy(), logits.float().cpu().numpy()
        return [{"logits": logits[i], "map": maps[i], "target": int(chosen[i])}
                for i in range(len(batch))]

    # --- finish ---------------------------------------------------------------------------
    def finish_stream(self, stream: Stream) -> tuple[dict[str, Any], bytes | None]:
        meta, p = stream.meta, stream.job.params
        first = stream.outputs[0]
        scores = self._activate(first["logits"])
        target = first.get("target", meta["target"])
        if target is None:
            target = int(np.argmax(scores))
        method = meta["method"]
        if method == "cam":
            assert self.explainer is not None
            features = torch.from_numpy(np.asarray(first["features"], dtype=np.float32))
            heat = em.cam(features[None], self.explainer.head_weight.float().cpu(),
                          torch.tensor([target]))[0].numpy()
        elif method == "occlusion":
            heat = self._occlusion_map(stream, scores, target)
        else:
            heat = first["map"]
        geometry: Geometry = meta["geometry"]
        render = p.get("render")
        if render in ("overlay", "heatmap"):
            cells = (em.grid_region(meta["patch"], meta["stride"], meta["grid"])
                     if method == "occlusion" else None)
            return {}, encode_png(self.render(heat, geometry, meta["image"],
                                              overlay=render == "overlay", cells=cells))
        top_k = int(p.get("top_k") or 5)
        order = np.argsort(-scores, kind="stable")[:top_k]
        grid = pool_grid(heat)
        width, height = meta["size"]
        result: dict[str, Any] = {
            "method": method,
            "layer": meta["layer"],
            "target": {"label": self.label(target), "class_id": target,
                       "score": round(float(scores[target]), 6)},
            "top": [{"label": self.label(int(i)), "class_id": int(i),
                     "score": round(float(scores[i]), 6)} for i in order],
            "heatmap": {"shape": list(grid.shape),
                        "data": em.grid_json(grid),
                        "region": (occlusion_region(meta, geometry) if method == "occlusion"
                                   else region(geometry))},
            "image": {"width": width, "height": height},
        }
        if method == "occlusion":
            result["occlusion"] = {"patch": meta["patch"], "stride": meta["stride"],
                                   "positions": len(meta["positions"])}
        return result, None

    def _activate(self, logits: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(logits, dtype=np.float32).reshape(-1))
        if self.cfg.output.activation == "softmax":
            x = x.softmax(dim=0)
        elif self.cfg.output.activation == "sigmoid":
            x = x.sigmoid()
        return x.numpy()

    def _occlusion_map(self, stream: Stream, scores: np.ndarray, target: int) -> np.ndarray:
        """Zeiler & Fergus: the target's probability drop with the patch at each position,
        as a grid of positions; drops below zero (the patch helped) count as zero."""
        base = float(scores[target])
        drops = np.array([base - float(self._activate(out["logits"])[target])
                          for out in stream.outputs[1:]], dtype=np.float32)
        grid = drops.reshape(stream.meta["grid"]).clip(min=0)
        top = grid.max()
        return grid / top if top > 0 else grid

    def render(self, heat: np.ndarray, geometry: Geometry, image: torch.Tensor | None,
               overlay: bool, cells: list[float] | None = None) -> torch.Tensor:
        """The heatmap on the original image's pixels (JET colours), over the image at
        half opacity (`overlay`) or alone; outside the model's view (a centre crop's
        margins) the map is zero. `cells`: the input-pixel rectangle the grid tiles, when
        not the whole input (occlusion's patch centres). # -> [3, H, W] uint8"""
        in_h, in_w = geometry.input_hw
        grid = torch.from_numpy(np.asarray(heat, dtype=np.float32))[None]
        if cells is None:
            full = em.upsample(grid, (in_h, in_w))
        else:
            x1, y1, x2, y2 = (int(round(v)) for v in cells)
            full = torch.zeros(1, in_h, in_w)
            full[:, y1:y2, x1:x2] = em.upsample(grid, (y2 - y1, x2 - x1))
        mapped = geometry.map_to_original(full, mode="bilinear")[0]
        h, w = geometry.original_hw
        x1, y1, x2, y2 = region(geometry)
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[max(0, int(y1)):int(np.ceil(y2)), max(0, int(x1)):int(np.ceil(x2))] = True
        colour = colour_map(torch.where(inside, mapped, torch.zeros_like(mapped)))
        if not overlay or image is None:
            return colour.contiguous()
        blend = (0.5 * image.float() + 0.5 * colour.float()).round().clamp(0, 255)
        return torch.where(inside, blend.to(torch.uint8), image)  # the crop's margins as sent

    def warmup_jobs(self) -> list[Job]:
        """The forward path on generated scenes: what the batch policy measures, since an
        occlusion's copies are most of what forms large batches."""
        jobs = super().warmup_jobs()
        for job in jobs:
            job.params = {"method": "occlusion"}
        return jobs


def colour_map(heat: torch.Tensor) -> torch.Tensor:
    """# [..., H, W] values in [0, 1] -> [..., 3, H, W] uint8 RGB, OpenCV's JET colours."""
    levels = (heat.clamp(0, 1).numpy() * 255).astype(np.uint8)
    flat = levels.reshape(-1, *levels.shape[-2:])
    rgb = np.stack([cv2.applyColorMap(m, cv2.COLORMAP_JET)[:, :, ::-1] for m in flat])
    out = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2)
    return out.reshape(*levels.shape[:-2], 3, *levels.shape[-2:])


def pool_grid(heat: np.ndarray, limit: int = MAX_GRID) -> np.ndarray:
    """A map larger than `limit` a side, area-averaged down to fit (saliency and guided
    maps come at the input's resolution) and rescaled so that its strongest cell is 1
    again, as every method's map is."""
    h, w = heat.shape
    if h <= limit and w <= limit:
        return np.asarray(heat, dtype=np.float32)
    scale = max(h, w) / limit
    size = (max(1, round(h / scale)), max(1, round(w / scale)))
    t = torch.from_numpy(np.asarray(heat, dtype=np.float32))[None, None]
    pooled = torch.nn.functional.adaptive_avg_pool2d(t, size)[0, 0].numpy()
    top = pooled.max()
    return pooled / top if top > 0 else pooled


def occlusion_region(meta: dict[str, Any], geometry: Geometry) -> list[float]:
    """What an occlusion grid's cells tile (centres at the patch centres), in original
    pixels: explain_methods.grid_region in the model input, mapped back."""
    x1, y1, x2, y2 = em.grid_region(meta["patch"], meta["stride"], meta["grid"])
    (sx, sy), (ox, oy) = geometry.scale_xy, geometry.offset_xy
    return [round(v, 2) for v in ((x1 - ox) / sx, (y1 - oy) / sy, (x2 - ox) / sx,
                                  (y2 - oy) / sy)]


def region(geometry: Geometry) -> list[float]:
    """The part of the original image the model saw (and the heatmap covers), x1 y1 x2 y2
    in original pixels: all of it for a stretch, the crop of a centre crop."""
    (sx, sy), (ox, oy) = geometry.scale_xy, geometry.offset_xy
    in_h, in_w = geometry.input_hw
    h, w = geometry.original_hw
    x1, y1 = max(0.0, -ox / sx), max(0.0, -oy / sy)
    x2, y2 = min(float(w), (in_w - ox) / sx), min(float(h), (in_h - oy) / sy)
    return [round(v, 2) for v in (x1, y1, x2, y2)]

"""The attribution methods of /explain, on a batch: # [B, 3, H, W] input -> [B, h, w] maps.

Each takes the eager module (gradients need autograd), a batch and each item's target
class, and returns maps in [0, 1] with the logits of the pass that made them. Items of a
batch are independent (the module is in eval mode), so one backward of the sum of the
items' target scores gives every item its own gradient.

Written here rather than calling pytorch-grad-cam (tests/test_explain.py holds them to it):
the package computes on numpy after moving every activation and gradient to the host,
registers hooks per call object, and has no saliency or occlusion; the formulas are a few
lines each. Conventions follow it: the score is the target's logit (ClassifierOutputTarget),
the map is ReLU'd, then scaled to [0, 1] by (x - min) / (max + 1e-7) as scale_cam_image does.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvserve.app.errors import InputError

EPS = 1e-7  # pytorch-grad-cam's scale_cam_image
MAX_OCCLUSION_POSITIONS = 1024


def scale(maps: torch.Tensor) -> torch.Tensor:
    """# [B, ...] -> [B, ...] in [0, 1], per map: (x - min) / (max(x - min) + 1e-7)."""
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (flat.max(dim=1, keepdim=True).values + EPS)
    return flat.view_as(maps)


def module_at(net: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path (`layer4`, `features.stage4`); KeyError names the
    top-level ones when it does not exist."""
    modules = dict(net.named_modules())
    if path not in modules or not path:
        top = ", ".join(name for name, _ in net.named_children())
        raise KeyError(f"no layer '{path}' (top-level layers: {top}; deeper ones by dotted "
                       "path, e.g. layer4.2)")
    return modules[path]


@contextmanager
def capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Holds the module's output of its last call in the block (a module called twice,
    as EfficientNet's shared activation is, yields its later call: the head's)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: object, output: torch.Tensor) -> None:
        seen[:] = [output]

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _targets(logits: torch.Tensor, targets: list[int | None]) -> torch.Tensor:
    """Each item's target: the one asked for, else its top-1."""
    top = logits.argmax(dim=1)
    return torch.tensor([t if t is not None else int(top[i]) for i, t in enumerate(targets)],
                        device=logits.device)


def _target_score(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, chosen[:, None]).sum()


def layer_gradients(net: nn.Module, x: torch.Tensor, targets: list[int | None], layer: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward and backward: (activations [B, K, h, w], their gradients, logits,
    chosen targets [B])."""
    with torch.enable_grad(), capture(module_at(net, layer)) as seen:
        # The parameters need no gradient: the input's flag puts the layer on the graph.
        logits = net(x.detach().requires_grad_(True))
        chosen = _targets(logits.detach(), targets)
        activations = seen[0]
        grads, = torch.autograd.grad(_target_score(logits, chosen), activations)
    return activations.detach(), grads, logits.detach(), chosen


def gradcam(net: nn.Module, x: torch.Tensor, targets: list[int | None], layer: str,
            plus: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM (Selvaraju et al.): channel weights are the gradients' spatial mean.
    Grad-CAM++ (Chattopadhyay et al.), as pytorch-grad-cam computes it: weights are the
    positive gradients weighted by alpha = g^2 / (2 g^2 + sum(A) g^3). A video model's
    layer gives [B, K, t, h, w] and its maps are over time too.
    -> (maps [B, h, w] or [B, t, h, w], logits [B, C], targets [B])"""
    a, g, logits, chosen = layer_gradients(net, x, targets, layer)
    space = tuple(range(2, a.ndim))
    if plus:
        g2 = g.pow(2)
        alpha = g2 / (2 * g2 + a.sum(dim=space, keepdim=True) * g2 * g + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        weights = (g.clamp(min=0) * alpha).sum(dim=space)
    else:
        weights = g.mean(dim=space)
    maps = (weights.view(*weights.shape, *[1] * len(space)) * a).sum(dim=1).clamp(min=0)
    return scale(maps), logits, chosen


def cam(features: torch.Tensor, head_weight: torch.Tensor, chosen: torch.Tensor
        ) -> torch.Tensor:
    """Class activation mapping (Zhou et al.): the head's weights for the target class over
    the last feature map, forward only. # [B, K, h, w], [C, K], [B] -> [B, h, w] in [0, 1].
    ReLU'd as Grad-CAM is, so that on a GAP + linear model the two agree up to scale."""
    weights = head_weight[chosen].to(features.dtype)  # [B, K]
    return scale(torch.einsum("bk,bkhw->bhw", weights, features).clamp(min=0))


def input_gradient(net: nn.Module, x: torch.Tensor, targets: list[int | None]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(target logit) / d(input): (gradients [B, 3, H, W], logits, targets)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = net(x)
        chosen = _targets(logits.detach(), targets)
        grads, = torch.autograd.grad(_target_score(logits, chosen), x)
    return grads, logits.detach(), chosen


def saliency(net: nn.Module, x: torch.Tensor, targets: list[int | None]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simonyan et al.: |d score / d pixel|, the maximum over colour channels."""
    grads, logits, chosen = input_gradient(net, x, targets)
    return scale(grads.abs().amax(dim=1)), logits, chosen


class GuidedReLUFunction(torch.autograd.Function):
    """ReLU (or ReLU6) whose backward passes only positive gradients where the input was
    in the unit's linear range (Springenberg et al.)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                upper: float) -> torch.Tensor:
        open_ = (x > 0) if upper == float("inf") else (x > 0) & (x < upper)
        ctx.save_for_backward(open_)
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor, None]:
        open_, = ctx.saved_tensors
        return grad.clamp(min=0) * open_, None


class GuidedReLU(nn.Module):
    def __init__(self, upper: float = float("inf")) -> None:
        super().__init__()
        self.upper = upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GuidedReLUFunction.apply(x, self.upper)


def guided_copy(net: nn.Module) -> nn.Module:
    """A copy of the module with every nn.ReLU / nn.ReLU6 module made guided (what
    pytorch-grad-cam's GuidedBackpropReLUModel does). ReLUs applied as functions
    (F.relu) are not seen: the exporters' architectures use modules."""
    guided = copy.deepcopy(net)
    for parent in guided.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, GuidedReLU(6.0))
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, GuidedReLU())
    return guided.eval()


def guided_backprop(guided: nn.Module, x: torch.Tensor, targets: list[int | None]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (input gradients through guided ReLUs [B, 3, H, W], logits, targets)."""
    return input_gradient(guided, x, targets)


def upsample(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """# [B, h, w] -> [B, H, W], bilinear, half-pixel centres (cv2.resize's INTER_LINEAR,
    what pytorch-grad-cam scales its maps to the input with)."""
    return F.interpolate(maps[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]


def gradient_map(grads: torch.Tensor) -> torch.Tensor:
    """An input-gradient image [B, 3, H, W] as one map: |g| maximum over channels."""
    return scale(grads.abs().amax(dim=1))


class Explainer:
    """The eager module of one classifier and the methods that need it. One batch at a time
    (hooks are per module, so two threads must not interleave)."""

    def __init__(self, net: nn.Module, device: str, head: str, layer: str) -> None:
        self.net = net.eval().to(device)
        for p in self.net.parameters():
            p.requires_grad_(False)  # gradients flow to activations and inputs only
        self.device = device
        self.layer = layer
        self.head = module_at(self.net, head)
        if not isinstance(self.head, nn.Linear):
            raise TypeError(f"head '{head}' is a {type(self.head).__name__}, not nn.Linear")
        module_at(self.net, layer)  # fails at load, not at the first request
        self._guided: nn.Module | None = None
        self.lock = threading.Lock()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.head.weight.detach()

    @property
    def guided(self) -> nn.Module:
        if self._guided is None:
            self._guided = guided_copy(self.net)
        return self._guided

    def run(self, method: str, x: torch.Tensor, targets: list[int | None], layer: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch of one gradient method -> (maps [B, h, w] in [0, 1], logits, targets).
        guided-gradcam's maps are at input resolution: Grad-CAM upsampled times guided
        backprop, as in Selvaraju et al."""
        x = x.to(self.device)
        with self.lock:
            if method in ("gradcam", "gradcam++"):
                return gradcam(self.net, x, targets, layer, plus=method == "gradcam++")
            if method == "saliency":
                return saliency(self.net, x, targets)
            if method == "guided-backprop":
                grads, logits, chosen = guided_backprop(self.guided, x, targets)
                return gradient_map(grads), logits, chosen
            if method == "guided-gradcam":
                maps, logits, chosen = gradcam(self.net, x, targets, layer)
                grads, _, _ = guided_backprop(self.guided, x, chosen.tolist())
                weighted = grads * upsample(maps, tuple(x.shape[-2:]))[:, None]
                return gradient_map(weighted), logits, chosen
        raise ValueError(f"not a gradient method: {method}")


def occlusion_plan(height: int, width: int, params: dict[str, Any], where: str
                   ) -> dict[str, Any]:
    """Occlusion's patch positions (Zeiler & Fergus): a `patch`-pixel square every `stride`
    pixels (defaults: a seventh of the shorter side, half of that) over an area of
    height x width (`where` names it in errors: "the model input", "the image")."""
    patch = int(params.get("patch") or max(8, min(height, width) // 7))
    stride = int(params.get("stride") or max(1, patch // 2))
    if patch > min(height, width):
        raise InputError(f"patch {patch} is larger than {where} ({width}x{height})")
    ys = list(range(0, height - patch + 1, stride))
    xs = list(range(0, width - patch + 1, stride))
    if len(ys) * len(xs) > MAX_OCCLUSION_POSITIONS:
        raise InputError(f"patch {patch} / stride {stride} gives {len(ys) * len(xs)} "
                         f"positions on {where} ({width}x{height}); at most "
                         f"{MAX_OCCLUSION_POSITIONS}: use a larger stride")
    return {"patch": patch, "stride": stride, "grid": (len(ys), len(xs)),
            "positions": [(y, x) for y in ys for x in xs]}


def grid_region(patch: int, stride: int, grid: tuple[int, int]) -> list[float]:
    """The rectangle an occlusion grid's cells tile (cell centres at the patch centres,
    `stride` apart), x1 y1 x2 y2 in the pixels the positions are in."""
    start = (patch - stride) / 2
    rows, cols = grid
    return [start, start, start + cols * stride, start + rows * stride]


def parse_target(value: Any, labels: list[str], model: str) -> int | None:
    """/explain's `target`: a class id or a label -> class id; None (or empty): each
    item's top-1."""
    if value is None or value == "":
        return None
    text = str(value)
    if text.lstrip("-").isdigit():
        class_id = int(text)
        if class_id < 0 or (labels and class_id >= len(labels)):
            raise InputError(f"target {class_id} is not a class of {model} "
                             f"(0 .. {max(len(labels), 1) - 1})")
        return class_id
    if text in labels:
        return labels.index(text)
    raise InputError(f"target '{text}' is neither a class id nor a label of {model} "
                     f"(GET /models/{model} lists them)")


def grid_json(grid: Any) -> list[list[float]]:
    """A heatmap grid as JSON rows, 4 decimals. Rounded in float64: float32 values rounded
    in place print as 0.0575999990105629 rather than 0.0576."""
    return np.round(np.asarray(grid, dtype=np.float64), 4).tolist()

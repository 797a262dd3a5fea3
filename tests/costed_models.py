"""Detection models whose cost is known by construction, for batching and cancellation tests.

Both take 64x64 letterboxed images and answer in YOLOX's output layout (84 anchor points
for strides 8/16/32, 85 values each, all zero: no detections), so they are served by
/detect like any exported model.

- `per_image`: a chain of element-wise ops over each image; cost grows with the batch in
  exact proportion, so a larger batch buys nothing.
- `per_call`: a chain of matrix-vector products that does not depend on the batch size;
  the per-image work is negligible, so throughput grows almost linearly with the batch.
- `stuck`: answers at once, except for a nearly white image: on that one it spins until
  its process is killed (a model wedged by one input; TorchScript, for the loop).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

ANCHORS = 8 * 8 + 4 * 4 + 2 * 2  # a 64x64 input at strides 8, 16, 32


class PerImage(nn.Module):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        y = images.repeat(1, 1, 8, 8)  # [B, 3, 512, 512]: big enough to use every core
        for _ in range(self.steps):
            y = torch.sin(y) * 1.01
        s = y.mean((1, 2, 3)) * 0  # [B]
        return torch.zeros(1, ANCHORS, 85) + s[:, None, None]


class PerCall(nn.Module):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.w = nn.Parameter(torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
                              / 32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = images.mean().reshape(1, 1) * torch.ones(1, 1024)
        for _ in range(self.steps):
            v = torch.tanh(v @ self.w)
        s = images.mean((1, 2, 3)) * 0 + v.sum() * 0  # [B]
        return torch.zeros(1, ANCHORS, 85) + s[:, None, None]


class Stuck(nn.Module):
    """No detections, at once; but an image whose mean pixel is above `white` (of 255)
    keeps it spinning for as long as its process lives. The warm-up's scenes are far
    darker, so a worker serving it starts like any other."""

    def __init__(self, white: float = 250.0) -> None:
        super().__init__()
        self.white = white
        self.anchors = ANCHORS  # an attribute: TorchScript reads no module globals

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        y = images
        while bool((images.mean((1, 2, 3)) > self.white).any()):
            y = torch.sin(y)
        s = y.mean((1, 2, 3)) * 0  # [B]
        return torch.zeros(1, self.anchors, 85) + s[:, None, None]


def write_model(repo: Path, name: str, module: nn.Module, batching: str,
                backend: str = "onnx") -> Path:
    """`repo/name/` with model.onnx (dynamic batch) or, for backend "torchscript", a
    scripted model.pt, and a model.toml; `batching` is the body of its [batching] table."""
    folder = repo / name
    folder.mkdir(parents=True)
    with warnings.catch_warnings():  # the legacy exporter's and TorchScript's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if backend == "torchscript":  # scripted: a loop on the input's values stays a loop
            torch.jit.script(module.eval()).save(str(folder / "model.pt"))
        else:
            torch.onnx.export(module.eval(), (torch.zeros(1, 3, 64, 64),),
                              str(folder / "model.onnx"), dynamo=False,
                              input_names=["images"], output_names=["output"],
                              dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
    (folder / "labels.txt").write_text("thing\n")
    (folder / "model.toml").write_text(f"""
task = "detection"
backend = "{backend}"
file = "{'model.pt' if backend == 'torchscript' else 'model.onnx'}"
inputs = ["images"]
outputs = ["output"]

[input]
scale = 1.0
mean = [0, 0, 0]
std = [1, 1, 1]
resize = "letterbox"
size = [64, 64]

[output]
decoder = "yolox"

[batching]
{batching}
""")
    return folder

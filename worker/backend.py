"""One backend interface: named input arrays in, named output arrays out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from cvserve.app.settings import Settings

from .repository import ModelConfig

Arrays = dict[str, np.ndarray]


def resolve_device(setting: str) -> str:
    """`auto` picks CUDA when torch sees a GPU, else the CPU."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


class Backend(ABC):
    """A loaded artifact. `run` takes a batch of any size up to the model's max batch."""

    platform: str
    device: str

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        # Sizes the artifact accepts; None means any.
        self.batch_sizes: list[int] | None = None
        # The most images worth putting in one batch (a graph fixed at batch 1: 1).
        self.batch_limit: int | None = None
        self.batch_mode = "dynamic"
        # Whether the warm-up may try several instances with their own thread counts.
        self.parallel_instances = False

    def run(self, inputs: Arrays) -> Arrays:
        """Run a batch; pads up to an accepted batch size and slices the outputs back."""
        n = next(iter(inputs.values())).shape[0]
        if self.batch_sizes is None:
            return self._run(inputs)
        size = next((b for b in self.batch_sizes if b >= n), None)
        if size is None:  # more than the largest artifact takes: run in chunks
            top = self.batch_sizes[-1]
            parts = [self.run({k: v[i:i + top] for k, v in inputs.items()})
                     for i in range(0, n, top)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if size > n:  # repeat the last item: real data, so no degenerate padding inputs
            inputs = {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)])
                      for k, v in inputs.items()}
        return {k: v[:n] for k, v in self._run(inputs).items()}

    @abstractmethod
    def _run(self, inputs: Arrays) -> Arrays: ...

    def set_threads(self, threads: int, keep: bool = False) -> None:  # noqa: B027
        """Use `threads` intra-op threads per run (the warm-up may choose one thread for
        each of several instances over several threads for one). With `keep`, runs inside
        `solo_threads()` still get the previous count. Optional: GPUs ignore it."""

    @contextmanager
    def solo_threads(self) -> Iterator[None]:
        """Runs in this block may use every core (a batch running alone)."""
        yield

    def describe(self) -> dict:
        return {"platform": self.platform, "device": self.device,
                "batch_sizes": self.batch_sizes, "batch_mode": self.batch_mode}


def load_backend(cfg: ModelConfig, settings: Settings) -> Backend:
    if cfg.backend == "onnx":
        from .onnx_backend import OnnxBackend
        return OnnxBackend(cfg, settings)
    from .torchscript_backend import TorchScriptBackend
    return TorchScriptBackend(cfg, settings)

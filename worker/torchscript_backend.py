"""TorchScript backend: CUDA when present (fp16 optional), the CPU otherwise."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from cvserve.app.settings import Settings

from .backend import Arrays, Backend, resolve_device
from .repository import ModelConfig


class TorchScriptBackend(Backend):
    platform = "pytorch_libtorch"

    def __init__(self, cfg: ModelConfig, settings: Settings) -> None:
        super().__init__(cfg)
        self.device = resolve_device(settings.device)
        if settings.intra_op_threads:
            torch.set_num_threads(settings.intra_op_threads)
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but remains what torchvision detectors
            # export to with a variable batch; the warning tells a user nothing to do.
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(cfg.artifact()), map_location=self.device)
        self.module.eval()

    def _run(self, inputs: Arrays) -> Arrays:
        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device)
                for name in self.cfg.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {name: t.cpu().numpy() for name, t in zip(self.cfg.outputs, out, strict=True)}

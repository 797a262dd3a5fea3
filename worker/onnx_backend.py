"""ONNX Runtime backend: TensorRT / CUDA providers when present, the CPU otherwise."""

from __future__ import annotations

import logging

import onnxruntime as ort

from cvserve.app.settings import Settings

from .backend import Arrays, Backend, resolve_device
from .repository import ModelConfig

log = logging.getLogger("cvserve.onnx")

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def select_providers(available: list[str], device: str) -> list[str]:
    """Providers in preference order for a device setting ('cpu', 'cuda', 'auto', 'cuda:N')."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in GPU_PROVIDERS if p in available]
    if device.startswith("cuda") and not gpu:
        raise RuntimeError(f"device '{device}' asked for, but onnxruntime has only {available}; "
                           "install onnxruntime-gpu or set CVSERVE_DEVICE=cpu")
    return [*gpu, "CPUExecutionProvider"]


class OnnxBackend(Backend):
    platform = "onnxruntime_onnx"

    def __init__(self, cfg: ModelConfig, settings: Settings) -> None:
        super().__init__(cfg)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.intra_op_threads or settings.cores
        opts.inter_op_num_threads = 1
        # Spinning intra-op threads steal the cores that decoding needs (../shared/PERF.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      "1" if settings.onnx_spinning else "0")
        want = settings.device if settings.device != "auto" else "auto"
        providers = select_providers(ort.get_available_providers(), want)
        self.device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"
        if self.device == "cpu" and resolve_device(settings.device) != "cpu":
            log.info("%s: onnxruntime has no GPU provider; running on the CPU", cfg.name)
        if "{batch}" in cfg.file:
            self.batch_sizes = list(cfg.batching.batch_sizes or [1])
            paths = {b: cfg.artifact(b) for b in self.batch_sizes}
        else:
            paths = {0: cfg.artifact()}
        self.sessions = {b: ort.InferenceSession(str(p), opts, providers=providers)
                         for b, p in paths.items()}
        self.providers = providers

    def _run(self, inputs: Arrays) -> Arrays:
        n = next(iter(inputs.values())).shape[0]
        sess = self.sessions.get(n) or self.sessions[0]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, inputs), strict=True))

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers}

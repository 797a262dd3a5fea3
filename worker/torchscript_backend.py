"""TorchScript backend: CUDA when present (fp16 optional), the CPU otherwise.

On CUDA a batch moves in two steps that may run on different threads:

    stage(inputs)       any thread: pinned copy -> asynchronous host-to-device copy on
                        that thread's side stream -> an event (worker/gpu.py)
    run_staged(staged)  the model thread: the compute stream waits for the event (the
                        thread does not) -> module -> outputs copied back, one sync

`run(inputs)` does both in turn; a task that stages its inputs on the decode pool
(worker/detection.py) lets the copies of the next batch overlap this batch's compute.
On the CPU, stage() only wraps the arrays as tensors: no stream, event or pinned memory.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from cvserve.app.settings import Settings

from .backend import Arrays, Backend, resolve_device
from .gpu import Staged, is_cuda, record_ready, staging, upload
from .openmp import ThreadLimit
from .repository import ModelConfig

log = logging.getLogger("cvserve.torchscript")


def half_precision(cfg: ModelConfig, settings: Settings, device: str) -> tuple[bool, str]:
    """Whether this model runs in fp16 here, and why (for the log and /models)."""
    if not getattr(settings, "fp16", False):
        return False, "float32 (CVSERVE_FP16 is off)"
    if not is_cuda(device):
        return False, (f"float32: CVSERVE_FP16 applies on a GPU only, and {cfg.name} runs on "
                       f"{device}")
    if not getattr(cfg, "allow_fp16", False):
        return False, (f"float32: CVSERVE_FP16 is on, but {cfg.name}'s model.toml does not set "
                       "allow_fp16 = true (set it once fp16 results are checked for the model)")
    return True, f"float16 (CVSERVE_FP16, allowed by {cfg.name}'s model.toml)"


class TorchScriptBackend(Backend):
    platform = "pytorch_libtorch"

    def __init__(self, cfg: ModelConfig, settings: Settings) -> None:
        super().__init__(cfg)
        self.device = resolve_device(settings.device)
        # On the CPU each model thread sets its own intra-op thread count before it runs
        # (worker/openmp.py says why never torch.set_num_threads), so instances of one
        # thread each may run side by side, and a batch that runs alone may use every core.
        self._limit = ThreadLimit() if self.device == "cpu" else None
        self.parallel_instances = bool(self._limit and self._limit.available)
        self.threads = settings.intra_op_threads or settings.cores
        self._solo: int | None = None  # a batch alone's count, where set_threads kept one
        self.fp16, self.precision = half_precision(cfg, settings, self.device)
        if self.fp16:
            log.info("%s: %s", cfg.name, self.precision)
        elif getattr(settings, "fp16", False):  # asked for and not applied: say why
            log.warning("%s: %s", cfg.name, self.precision)
        self.module = self._load()
        # On the CPU a run takes a copy of the module no other run holds (one is loaded
        # for each instance running at once, as Triton's instances are): two threads
        # running one module with different thread counts crashed the process here
        # (segfaults in 4 of 8 tries with the demo detector; 0 of 20 with a copy each).
        self._spare = [self.module]
        self._spare_lock = threading.Lock()
        self._local = threading.local()  # CUDA: each model thread's compute stream

    def _load(self) -> torch.jit.ScriptModule:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but remains what torchvision detectors
            # export to with a variable batch; the warning tells a user nothing to do.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(self.cfg.artifact()), map_location=self.device)
        module.eval()
        if self.fp16:
            # Parameters and buffers to half; float inputs are cast in run_staged and
            # float outputs back to float32, so callers see the float32 interface.
            module.half()
        return module

    @contextmanager
    def _checkout(self) -> Iterator[torch.jit.ScriptModule]:
        """A module for one run: the shared one on a GPU (its streams keep instances
        apart), on the CPU one that no other run holds (a new copy if all are busy)."""
        if self._limit is None:
            yield self.module
            return
        with self._spare_lock:
            module = self._spare.pop() if self._spare else None
        if module is None:
            module = self._load()
        try:
            yield module
        finally:
            with self._spare_lock:
                self._spare.append(module)

    def set_threads(self, threads: int, keep: bool = False) -> None:
        """Runs use `threads` intra-op threads from now on, whichever thread runs them
        (CPU only). With `keep`, runs inside `solo_threads()` still get the previous count."""
        if keep and threads != self.threads:
            self._solo = self.threads
        self.threads = threads

    @contextmanager
    def solo_threads(self) -> Iterator[None]:
        """This thread's runs in the block use the kept count (a batch alone on the CPU)."""
        self._local.solo = True
        try:
            yield
        finally:
            self._local.solo = False

    def _apply_threads(self) -> None:
        if self._limit is not None:
            solo = getattr(self._local, "solo", False) and self._solo is not None
            self._limit.set(self._solo if solo else self.threads)

    @property
    def compute_stream(self) -> torch.cuda.Stream | None:
        """The calling thread's compute stream (made on first use); None on the CPU.

        One per model thread, so that instances running batches side by side overlap on
        the GPU. High priority: its kernels go first when the decode threads' staging
        kernels compete for the SMs, and it comes from another stream pool than their side
        streams, so it is never one of them."""
        if not is_cuda(self.device):
            return None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.device, priority=-1)
        return stream

    def _run(self, inputs: Arrays) -> Arrays:
        return self.run_staged(self.stage(inputs))

    def stage(self, inputs: Mapping[str, np.ndarray | torch.Tensor]) -> Staged:
        """Start moving a batch's named inputs to the device; callable from any thread."""
        tensors = {name: torch.as_tensor(np.ascontiguousarray(v) if isinstance(v, np.ndarray)
                                         else v)
                   for name, v in inputs.items()}
        if not is_cuda(self.device):
            return Staged(tensors)
        with staging(self.device):
            moved = {name: upload(t, self.device) for name, t in tensors.items()}
            return Staged(moved, record_ready())

    @contextmanager
    def compute(self) -> Iterator[None]:
        """This thread's compute stream for the block (to collate staged items on the device
        before run_staged, as worker/detection.py does); a no-op on the CPU."""
        stream = self.compute_stream
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield

    def run_staged(self, staged: Staged) -> Arrays:
        """Run a staged batch: # named output arrays, float outputs as float32. Tensors are
        used where they are: a host tensor left in `staged` (image sizes the module reads
        with int(), say) stays on the host."""
        self._apply_threads()
        with self.compute():
            tensors = staged.take()
            args = [self._cast(tensors[name]) for name in self.cfg.inputs]
            with torch.inference_mode(), self._checkout() as module:
                out = module(*args)
            if isinstance(out, torch.Tensor):
                out = (out,)
            return dict(zip(self.cfg.outputs, self._to_host(list(out)), strict=True))

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.half() if self.fp16 and t.is_floating_point() else t

    def _to_host(self, outputs: list[torch.Tensor]) -> list[np.ndarray]:
        if not is_cuda(self.device):
            return [t.numpy() for t in outputs]
        # All outputs copied back asynchronously (into pinned memory) and one wait for the
        # lot, instead of one synchronizing copy per output.
        host = [(t.float() if t.dtype == torch.float16 else t).to("cpu", non_blocking=True)
                for t in outputs]
        record_ready().synchronize()
        return [t.numpy() for t in host]

    def describe(self) -> dict:
        return {**super().describe(), "precision": "float16" if self.fp16 else "float32"}

"""ONNX Runtime backend: TensorRT / CUDA providers when present, the CPU otherwise."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
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
        self.spinning = settings.onnx_spinning
        # Sessions carry their own thread counts and run concurrently (onnxruntime).
        self.parallel_instances = True
        self.threads = settings.intra_op_threads or settings.cores
        opts = self._options(self.threads)
        want = settings.device if settings.device != "auto" else "auto"
        providers = select_providers(ort.get_available_providers(), want)
        self.device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"
        if self.device == "cpu" and resolve_device(settings.device) != "cpu":
            log.info("%s: onnxruntime has no GPU provider; running on the CPU", cfg.name)
        self.providers = providers
        # What each session is built from (a path, or a rewritten graph), to rebuild them
        # with another thread count.
        self._sources: dict[int, str | bytes] = {}
        # Sessions with another thread count, kept for runs that want them.
        self._kept: dict[int, dict[int, ort.InferenceSession]] = {}
        self._local = threading.local()
        if "{batch}" in cfg.file:
            self.batch_sizes = list(cfg.batching.batch_sizes or [1])
            self.batch_mode = "one graph per batch size"
            self._sources = {b: str(cfg.artifact(b)) for b in self.batch_sizes}
            self.sessions = {b: ort.InferenceSession(src, opts, providers=providers)
                             for b, src in self._sources.items()}
        else:
            self.sessions = {0: self._load_single(cfg.artifact(), opts, providers)}

    def _options(self, threads: int) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Spinning intra-op threads steal the cores that decoding needs (../shared/PERF.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      "1" if self.spinning else "0")
        return opts

    def set_threads(self, threads: int, keep: bool = False) -> None:
        """Run with `threads` intra-op threads per session from now on. With `keep`, the
        current sessions stay loaded too, for runs that ask for them (`solo_threads`)."""
        if threads == self.threads:
            return
        if keep:
            self._kept[self.threads] = self.sessions
        self.threads = threads
        self.sessions = self._kept.pop(threads, None) or self._build(threads)

    def _build(self, threads: int) -> dict[int, ort.InferenceSession]:
        opts = self._options(threads)
        return {b: ort.InferenceSession(src, opts, providers=self.providers)
                for b, src in self._sources.items()}

    @contextmanager
    def solo_threads(self) -> Iterator[None]:
        """This thread's runs use the kept sessions with more threads, if any: a batch
        that runs alone on the machine is faster on every core."""
        if not self._kept:
            yield
            return
        self._local.sessions = next(iter(self._kept.values()))
        try:
            yield
        finally:
            self._local.sessions = None

    def _load_single(self, path: Path, opts: ort.SessionOptions,
                     providers: list[str]) -> ort.InferenceSession:
        """One graph. A batch dimension fixed at N is served at N (a batch is padded up, or
        split); fixed at 1 with batching asked for, it is made symbolic when the rewritten
        graph gives, item for item, what the original gives, else served one at a time."""
        self._sources[0] = str(path)
        sess = ort.InferenceSession(str(path), opts, providers=providers)
        dim = sess.get_inputs()[0].shape[0]
        if not isinstance(dim, int):
            self.batch_mode = "dynamic"
            return sess
        self.batch_sizes = [dim]
        self.batch_mode = f"fixed {dim}"
        if dim != 1 or self.cfg.batching.max_batch_size == 1:
            self.batch_limit = dim
            return sess
        if self.cfg.batching.symbolic_batch:
            rewritten = symbolic_batch(onnx.load(str(path)))
            candidate = ort.InferenceSession(rewritten, opts, providers=providers)
            problem = compare_batched(sess, candidate, self.cfg)
            if problem is None:
                log.info("%s: batch dimension made symbolic (checked against the fixed "
                         "graph)", self.cfg.name)
                self.batch_sizes, self.batch_mode = None, "dynamic (made symbolic, verified)"
                self._sources[0] = rewritten
                return candidate
            log.warning("%s: graph has a fixed batch of 1 and making it symbolic changed "
                        "its outputs (%s); serving one image at a time", self.cfg.name,
                        problem)
        self.batch_limit = 1
        return sess

    def _run(self, inputs: Arrays) -> Arrays:
        n = next(iter(inputs.values())).shape[0]
        sessions = getattr(self._local, "sessions", None) or self.sessions
        sess = sessions.get(n) or sessions[0]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, inputs), strict=True))

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers,
                "intra_op_threads": self.threads}


def symbolic_batch(model: onnx.ModelProto) -> bytes:
    """A copy of a fixed-batch graph whose inputs' and outputs' first dimension is
    symbolic. Reshape targets that hard-code the batch as a leading 1 are set to 0 (ONNX:
    "copy this dimension from the input"); stale intermediate shapes are dropped. A
    heuristic: `compare_batched` decides whether the result may be used."""
    graph = model.graph
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del graph.value_info[:]
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute
                      and n.attribute[0].name == "value"})
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in constants:
            tensor = constants[node.input[1]]
            shape = onnx.numpy_helper.to_array(tensor)
            if shape.ndim == 1 and shape.size > 1 and shape[0] == 1:
                shape = shape.copy()
                shape[0] = 0
                tensor.CopyFrom(onnx.numpy_helper.from_array(shape, tensor.name))
    return model.SerializeToString()


def compare_batched(fixed: ort.InferenceSession, batched: ort.InferenceSession,
                    cfg: ModelConfig, batch: int = 3) -> str | None:
    """None when `batched` run on `batch` different inputs gives what `fixed` gives on
    each alone; otherwise what differed."""
    rng = np.random.default_rng(0)
    spec = cfg.input
    lo = min((0 * spec.scale - m) / s for m, s in zip(spec.mean, spec.std, strict=True))
    hi = max((255 * spec.scale - m) / s for m, s in zip(spec.mean, spec.std, strict=True))
    feeds = {}
    for inp in fixed.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in inp.shape][1:]
        dtype = np.float32 if "float" in inp.type else np.int64
        feeds[inp.name] = rng.uniform(lo, hi, size=(batch, *shape)).astype(dtype)
    try:
        together = batched.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own types for shape errors
        return f"batch of {batch} failed: {exc}"
    for i in range(batch):
        alone = fixed.run(None, {k: v[i:i + 1] for k, v in feeds.items()})
        for name, a, b in zip((o.name for o in fixed.get_outputs()), alone, together,
                              strict=True):
            if b.shape[0] != batch or b.shape[1:] != a.shape[1:]:
                return f"output {name}: shape {list(b.shape)} for a batch of {batch}, " \
                       f"{list(a.shape)} alone"
            scale = float(np.abs(a).max()) or 1.0
            if not np.allclose(b[i:i + 1], a, rtol=1e-3, atol=1e-4 * scale):
                return f"output {name} differs by {float(np.abs(b[i:i + 1] - a).max()):.3g}"
    return None

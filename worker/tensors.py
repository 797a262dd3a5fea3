"""Raw tensors in, raw tensors out: the Open Inference Protocol's infer on a model's own
inputs (the client did the preprocessing). Jobs of task "tensors" join the model's queue
and batcher like any other: requests whose inputs agree on everything but the batch
dimension run as one batch (docs/design.md §9, "Open Inference Protocol").

A job's params carry the inputs' {name, datatype, shape} in order and the outputs
asked for; its payload is their contents, row-major, little-endian, one after another.
The answer is the outputs' {name, datatype, shape} and their contents the same way.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvserve.app.errors import InputError
from cvserve.app.queue import Job

from .task import Prepared, Task

# The protocol's datatypes (BYTES is the task pipeline's, handled by the api).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}
# ONNX Runtime's type strings.
_ORT = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
        "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
        "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
        "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64"}


def datatype(dtype: np.dtype) -> str:
    return _BY_DTYPE[np.dtype(dtype).newbyteorder("=")]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def onnx_signature(session: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An ONNX Runtime session's inputs and outputs; symbolic dimensions are -1."""
    def specs(values: list[Any]) -> list[TensorSpec]:
        return [TensorSpec(v.name, _ORT.get(v.type, v.type),
                           tuple(d if isinstance(d, int) else -1 for d in v.shape))
                for v in values]

    return specs(session.get_inputs()), specs(session.get_outputs())


def observed_signature(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
                       ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """What a TorchScript module was seen to take and give on its warm-up (a module has no
    declared signature): the dtypes and ranks as seen; the batch and, for images, the
    spatial dimensions may vary (-1)."""
    def specs(arrays: dict[str, np.ndarray]) -> list[TensorSpec]:
        out = []
        for name, a in arrays.items():
            shape = [-1, *a.shape[1:]]
            if a.ndim >= 4:  # [N, C, (T,) H, W]: any height and width
                shape[-2:] = [-1, -1]
            out.append(TensorSpec(name, datatype(a.dtype), tuple(shape)))
        return out

    return specs(inputs), specs(outputs)


class TensorTask(Task):
    """A model's backend run on the client's tensors. `signature` is filled when the model
    loads (worker/server.py)."""

    def __init__(self, task: Task) -> None:
        super().__init__(task.cfg, task.backend, task.settings)
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    def prepare(self, job: Job) -> Prepared:
        sent = job.params.get("inputs") or []
        expected = {spec.name: spec for spec in self.inputs}
        names = [t["name"] for t in sent]
        if sorted(names) != sorted(expected):
            raise InputError(f"model {self.cfg.name} takes inputs {sorted(expected)}; got "
                             f"{sorted(names)}")
        arrays, offset, batch = {}, 0, None
        for tensor in sent:
            spec = expected[tensor["name"]]
            shape = [int(d) for d in tensor["shape"]]
            if tensor["datatype"] != spec.datatype:
                raise InputError(f"input {spec.name}: expected datatype {spec.datatype}, got "
                                 f"{tensor['datatype']}")
            if len(shape) != len(spec.shape) or any(
                    want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)):
                raise InputError(f"input {spec.name}: expected shape {list(spec.shape)} (-1: "
                                 f"any), got {shape}")
            if batch is not None and shape[0] != batch:
                raise InputError(f"inputs disagree on the batch size: {batch} and {shape[0]}")
            batch = shape[0]
            dtype = DATATYPES[spec.datatype].newbyteorder("<")
            size = int(np.prod(shape)) * dtype.itemsize
            if offset + size > len(job.payload):
                raise InputError(f"input {spec.name}: shape {shape} of {spec.datatype} needs "
                                 f"{size} bytes; {len(job.payload) - offset} were sent")
            arrays[spec.name] = np.frombuffer(job.payload, dtype, int(np.prod(shape)),
                                              offset).reshape(shape).astype(dtype.newbyteorder(
                                                  "="), copy=True)
            offset += size
        if offset != len(job.payload):
            raise InputError(f"{len(job.payload) - offset} bytes more than the inputs' shapes "
                             "and datatypes take")
        if not batch:
            raise InputError("the batch dimension (the first) must be at least 1")
        asked = job.params.get("outputs") or [spec.name for spec in self.outputs]
        unknown = set(asked) - {spec.name for spec in self.outputs}
        if unknown:
            raise InputError(f"model {self.cfg.name} has no output {sorted(unknown)}; its "
                             f"outputs: {[spec.name for spec in self.outputs]}")
        return Prepared(job, arrays, {"batch": batch, "outputs": asked})

    def batch_key(self, item: Prepared) -> Hashable:
        """Run together only when everything but the batch dimension agrees."""
        return tuple((name, a.shape[1:], a.dtype.str) for name, a in sorted(item.inputs.items()))

    def run(self, batch: list[Prepared]) -> list[Any]:
        names = [spec.name for spec in self.inputs]
        joined = {name: np.concatenate([item.inputs[name] for item in batch]) for name in names}
        outputs = self.backend.run(joined)
        split, start = [], 0
        for item in batch:
            n = item.meta["batch"]
            split.append({k: v[start:start + n] for k, v in outputs.items()})
            start += n
        return split

    def finish(self, item: Prepared, output: Any) -> tuple[dict[str, Any], bytes | None]:
        specs, chunks = [], []
        for name in item.meta["outputs"]:
            array = np.ascontiguousarray(output[name])
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
            specs.append({"name": name, "datatype": datatype(array.dtype),
                          "shape": list(array.shape)})
            chunks.append(array.tobytes())
        return {"outputs": specs}, b"".join(chunks)


def signature(task: Task) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's inputs and outputs as raw tensors: ONNX Runtime's declared ones, or for
    TorchScript what one warm-up input was seen to give (run once more here, at load)."""
    sessions = getattr(task.backend, "sessions", None)
    if sessions:
        return onnx_signature(next(iter(sessions.values())))
    backend, seen = task.backend, {}
    run = backend.run

    def spy(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = run(inputs)
        seen.setdefault("io", (inputs, outputs))
        return outputs

    backend.run = spy  # type: ignore[method-assign]  # this one call only
    try:
        task.run([task.prepare(task.warmup_jobs()[0])])
    finally:
        del backend.run
    if "io" not in seen:  # staged on a GPU stream, not through run(): not offered
        return [], []
    inputs, outputs = seen["io"]
    return observed_signature({k: np.asarray(v) for k, v in inputs.items()},
                              {k: np.asarray(v) for k, v in outputs.items()})

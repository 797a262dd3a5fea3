"""The same detection pipeline under Triton (PyTriton) with Triton's dynamic batching.

Triton queues the requests and forms batches (up to --max-batch-size requests, waiting at
most --max-queue-delay-ms for more, as ../shared/PERF.md measured: 16 / 5 ms); PyTriton
hands each batch to one Python function in this process, which runs cvserve's own stages
on it: `task.prepare` for each image (decode + preprocess, one after the other), one
`task.run` for the batch, `task.finish` for each image. So bench/compare.py compares the
serving around the same pipeline, as with bench/plain_server.py.

The model takes one BYTES input `image` (an encoded image per request) and gives one BYTES
output `result` (that image's answer as JSON, the shape of cvserve's /detect without
`timing`). Clients speak KServe v2 over HTTP with Triton's binary tensor data extension:
`infer_request` builds such a request around the raw image bytes (no base64) and
`infer_answer` reads the answer back; bench/compare.py's clients use both.

    python bench/triton_server.py --model-repository models --model yolox-nano \
        --http-port 8000 --grpc-port 8001 --metrics-port 8002

CVSERVE_* variables (CVSERVE_DEVICE, CVSERVE_INTRA_OP_THREADS ...) apply as in cvserve.
Needs PyTriton (`pip install -e '.[triton]'`), which brings its own tritonserver.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

INPUT = "image"  # BYTES [1] per request: the encoded image
OUTPUT = "result"  # BYTES [1] per request: the answer, JSON
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary data extension's header
BYTES_LENGTH = struct.Struct("<I")  # a BYTES element: 4-byte little-endian length, bytes


# --- the wire format (KServe v2 + binary tensor data), client side ----------------------
def infer_request(image: bytes) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of one infer request for one image: a JSON header naming the input
    (shape [1, 1]: a batch of one request holding one element) and asking for the output
    as binary, then the input's bytes (length-prefixed, as BYTES elements are)."""
    header = json.dumps({
        "inputs": [{"name": INPUT, "shape": [1, 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": BYTES_LENGTH.size + len(image)}}],
        "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}],
    }).encode()
    body = b"".join((header, BYTES_LENGTH.pack(len(image)), image))
    return body, {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}


def infer_answer(body: bytes, header_length: str | None) -> dict[str, Any]:
    """The JSON answer in an infer response: `result`'s first element, binary (after the
    JSON header of `header_length` bytes) or, without that header, inline as JSON.
    ValueError when the response is not such an answer."""
    try:
        if header_length is None:
            [output] = [o for o in json.loads(body)["outputs"] if o["name"] == OUTPUT]
            return json.loads(output["data"][0])
        n = int(header_length)
        offset = n  # binary outputs follow the JSON header in the order it lists them
        for output in json.loads(body[:n])["outputs"]:
            if output["name"] == OUTPUT:
                [length] = BYTES_LENGTH.unpack_from(body, offset)
                start = offset + BYTES_LENGTH.size
                return json.loads(body[start:start + length])
            offset += output.get("parameters", {}).get("binary_data_size", 0)
    except (KeyError, IndexError, TypeError, struct.error) as exc:
        raise ValueError(f"not an answer with output '{OUTPUT}': {exc!r}") from exc
    raise ValueError(f"no output '{OUTPUT}' in the infer response")


# --- the server --------------------------------------------------------------------------
def infer_function(repository: Path, model: str) -> Callable[..., dict[str, np.ndarray]]:
    """PyTriton's inference callable for `repository/model`: a batch of encoded images
    ([B, 1] bytes) -> their answers ([B, 1] JSON bytes)."""
    from pytriton.decorators import batch

    from cvserve.app.queue import Job
    from cvserve.app.settings import Settings
    from cvserve.worker.repository import load_config
    from cvserve.worker.server import build_task

    cfg = load_config(repository / model)
    task = build_task(cfg, Settings(model_repository=repository))

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        images = inputs[INPUT][:, 0]  # [B] bytes objects
        # No deadline: nothing here checks it (cvserve's batcher would).
        items = [task.prepare(Job(model=cfg.name, task=cfg.task, payload=bytes(data),
                                  deadline_ms=0))
                 for data in images]
        # One task.run per batch key (the padded input shape of R-CNN models; any image
        # for fixed-size models such as YOLOX, so one call for the whole batch), as
        # cvserve's batcher groups them: a batched answer then equals the unbatched one.
        outputs: list[Any] = [None] * len(items)
        groups: dict[Any, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(task.batch_key(item), []).append(i)
        for indices in groups.values():
            for i, out in zip(indices, task.run([items[i] for i in indices]), strict=True):
                outputs[i] = out
        answers = [json.dumps({"model": cfg.name, **task.finish(item, out)[0]}).encode()
                   for item, out in zip(items, outputs, strict=True)]
        return {OUTPUT: np.array(answers, dtype=np.object_).reshape(-1, 1)}

    return infer


def serve(repository: Path, model: str, args: argparse.Namespace) -> None:
    """Bind the model into a PyTriton-launched tritonserver and serve until SIGINT/SIGTERM."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_address=args.host, http_port=args.http_port,
                          grpc_address=args.host, grpc_port=args.grpc_port,
                          metrics_address=args.host, metrics_port=args.metrics_port,
                          allow_gpu_metrics=False)
    # Triton runs the model's Python side in its python-backend stub, which links
    # libpython3.X.so from the loader's default path: with an interpreter of its own
    # (pyenv, conda) that is another patch release than this stdlib (here Debian's 3.11.2
    # under pyenv's 3.11.7 library, failing in multiprocessing). Put this interpreter's
    # libpython first; tritonserver passes its environment on to the stub.
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, (libdir, os.environ.get("LD_LIBRARY_PATH"))))
    # SIGTERM as SIGINT: serve() then stops tritonserver and removes its workspace.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=model,
            infer_func=infer_function(repository, model),
            inputs=[Tensor(name=INPUT, dtype=bytes, shape=(1,))],
            outputs=[Tensor(name=OUTPUT, dtype=bytes, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher(
                max_queue_delay_microseconds=round(args.max_queue_delay_ms * 1000))),
            strict=True,
        )
        triton.serve()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, required=True,
                   help="folder of model folders")
    p.add_argument("--model", required=True, help="the model folder to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="Triton's largest batch, in requests (default 16)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                   help="how long Triton holds a request for a fuller batch (default 5)")
    args = p.parse_args(argv)
    if args.max_batch_size < 1 or args.max_queue_delay_ms < 0:
        p.error("--max-batch-size must be >= 1 and --max-queue-delay-ms >= 0")
    serve(args.model_repository.resolve(), args.model, args)


if __name__ == "__main__":
    main()

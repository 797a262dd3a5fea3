"""Benchmark the Open Inference Protocol next to /detect and the backend alone, in one run.

One model (the demo detector, TorchScript, shipped weights), one `cvserve run` with gRPC on:

1. /detect: a JPEG through the task pipeline (decode, preprocess, model, postprocess).
2. v2 raw tensors over REST with binary tensor data, and over gRPC: the model's own inputs,
   preprocessed once here by the worker's own code, so the service only queues, batches
   and runs them.
3. v2 BYTES over REST: the same JPEG through /detect's pipeline, as a tensor.
4. the backend alone, in this process with the service stopped: the same raw tensors,
   one batch of 1 after another on one thread.

Each service row runs --concurrency closed-loop clients (Triton's own tritonclient for
v2, httpx for /detect) for --duration seconds after a warm-up; the table gives
requests/s and each row as a fraction of the backend alone.

    python bench/v2_bench.py --duration 10
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_loop(call: Callable[[], None], concurrency: int, warmup_s: float,
                duration_s: float) -> tuple[float, int]:
    """(requests/s, errors) of `concurrency` threads each calling `call` back to back."""
    counting = threading.Event()
    stop = threading.Event()
    done, errors = [0] * concurrency, [0] * concurrency

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                call()
            except Exception:  # counted, not fatal: the row reports it
                errors[i] += counting.is_set()
                continue
            done[i] += counting.is_set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    counting.set()
    t0 = time.perf_counter()
    time.sleep(duration_s)
    stop.set()
    elapsed = time.perf_counter() - t0
    for t in threads:
        t.join()
    return sum(done) / elapsed, sum(errors)


def raw_inputs(model_dir: Path) -> dict[str, np.ndarray]:
    """The backend's inputs for one scene, as the worker makes them."""
    from cvserve.app.queue import Job, now_ms
    from cvserve.app.settings import Settings
    from cvserve.models.synthetic import make_scene
    from cvserve.worker.repository import load_config
    from cvserve.worker.server import build_task

    task = build_task(load_config(model_dir), Settings())
    seen: dict[str, dict[str, np.ndarray]] = {}
    run = task.backend.run

    def spy(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.setdefault("inputs", inputs)
        return run(inputs)

    task.backend.run = spy  # type: ignore[method-assign]
    job = Job(model="m", task="detection", payload=make_scene(7, 640, 480).jpeg(),
              deadline_ms=now_ms() + 60_000)
    task.run([task.prepare(job)])
    return {k: np.ascontiguousarray(v) for k, v in seen["inputs"].items()}


def backend_alone(model_dir: Path, inputs: dict[str, np.ndarray], warmup_s: float,
                  duration_s: float) -> float:
    from cvserve.app.settings import Settings
    from cvserve.worker.backend import load_backend
    from cvserve.worker.repository import load_config

    backend = load_backend(load_config(model_dir), Settings())
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        backend.run(inputs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration_s:
        backend.run(inputs)
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds counted per row")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from cvserve.models.export import DEMO_WEIGHTS, export_detector
    from cvserve.models.synthetic import make_scene

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        model = "demo-ts"
        export_detector("tiny_fasterrcnn", repo, weights=str(DEMO_WEIGHTS), fmt="torchscript",
                        name=model, check=False)
        inputs = raw_inputs(repo / model)
        jpeg = make_scene(7, 640, 480).jpeg()
        port, grpc_port = free_port(), free_port()
        env = {**os.environ, "CVSERVE_MODEL_REPOSITORY": str(repo),
               "CVSERVE_PORT": str(port), "CVSERVE_GRPC_PORT": str(grpc_port),
               "CVSERVE_AUTO_BUILD_DEFAULT": "false"}
        log = open(repo / "service.log", "wb")  # noqa: SIM115 - closed below
        service = subprocess.Popen([sys.executable, "-m", "cvserve.app.cli", "run"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        rows: dict[str, tuple[float, int]] = {}
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            local = threading.local()

            def client(kind: str) -> object:
                if not hasattr(local, kind):
                    setattr(local, kind, httpclient.InferenceServerClient(
                        f"127.0.0.1:{port}") if kind == "http" else
                        grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"))
                return getattr(local, kind)

            def tensors(module: object) -> list:
                made = []
                for name, array in inputs.items():
                    t = module.InferInput(name, list(array.shape),  # type: ignore[attr-defined]
                                          "FP32" if array.dtype == np.float32 else "INT64")
                    t.set_data_from_numpy(array)
                    made.append(t)
                return made

            def detect() -> None:
                if not hasattr(local, "httpx"):  # kept-alive connections, as tritonclient's
                    local.httpx = httpx.Client(timeout=60)
                local.httpx.post(f"{url}/detect",
                                 files={"file": ("s.jpg", jpeg)}).raise_for_status()

            def rest_raw() -> None:
                client("http").infer(model, tensors(httpclient))  # type: ignore[attr-defined]

            def grpc_raw() -> None:
                client("grpc").infer(model, tensors(grpcclient))  # type: ignore[attr-defined]

            def rest_bytes() -> None:
                t = httpclient.InferInput("image", [1], "BYTES")
                t.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
                client("http").infer(model, [t])  # type: ignore[attr-defined]

            for name, call in (("/detect (JPEG, task pipeline)", detect),
                               ("v2 REST binary, raw tensors", rest_raw),
                               ("v2 gRPC, raw tensors", grpc_raw),
                               ("v2 REST binary, BYTES JPEG", rest_bytes)):
                rows[name] = closed_loop(call, args.concurrency, args.warmup, args.duration)
                print(f"  {name}: {rows[name][0]:.1f} req/s", file=sys.stderr)
        finally:
            service.terminate()
            service.wait(60)
            log.close()
        alone = backend_alone(repo / model, inputs, args.warmup, args.duration)

    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())
    print(f"\nmodel {model} (TorchScript, demo weights); raw inputs {shapes}; "
          f"concurrency {args.concurrency}, {args.duration:g} s per row\n")
    print(f"| {'path':32s} | req/s | of backend alone | errors |")
    print(f"|{'-' * 34}|-------|------------------|--------|")
    for name, (rate, errors) in rows.items():
        print(f"| {name:32s} | {rate:5.1f} | {rate / alone:16.2f} | {errors:6d} |")
    print(f"| {'backend alone, one at a time':32s} | {alone:5.1f} | {1:16.2f} | {0:6d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

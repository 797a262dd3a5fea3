"""Benchmark POST /detect: the service over HTTP next to the raw backend, in one table.

One invocation, one model:

1. service: `cvserve run` (or, with --redis-url, `cvserve api` + `cvserve worker`) on a
   free 127.0.0.1 port. At each concurrency N, N closed-loop clients (each sends its next
   image as soon as its previous answer arrives) run for a warm-up, then --duration
   seconds that count: throughput, latency, errors, and the worker's mean batch size
   (deltas of the Prometheus histogram `cvserve_inference_batch_size`).
2. raw backend, with the service stopped so that both never share the cores: the same
   model in this process, `task.run()` on a model thread (as in the worker) on images
   preprocessed once beforehand, at batch sizes 1, 2, 4 ... max_batch_size.
3. the table, and the two ratios the /detect issue sets targets for.

    python bench/detect_bench.py --duration 3 --concurrency 1,4          # a quick look
    python bench/detect_bench.py --model-repository models --model demo-detector --out r.json
    python bench/detect_bench.py --redis-url redis://127.0.0.1:6379/0    # Redis mode

bench/README.md says what each column means.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:  # the worker's types pull in torch, which only the raw part needs
    from cvserve.worker.task import Prepared, Task

DEFAULT_ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"
# Ten generated scenes (width, height px): landscape, portrait, square, small and large.
SCENE_SIZES = ((640, 480), (480, 640), (320, 320), (800, 600), (300, 200),
               (1024, 768), (512, 384), (256, 256), (720, 405), (400, 600))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BATCH_METRIC = "cvserve_inference_batch_size"
TIMING_PARTS = ("queue", "preprocess", "inference", "postprocess", "total")
REQUEST_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 180.0
# The issue's targets (see the module docstring, step 3).
THROUGHPUT_RATIO_TARGET = 0.90
C1_OVERHEAD_TARGET_MS = 5.0
WRONG_ANSWER = -1  # Answer.status of a 200 whose content a check rejected
# A check on each answer: (index of the image sent, the answer's JSON) -> as expected?
Check = Callable[[int, dict[str, Any]], bool]


@dataclass
class Row:
    """One line of the table: a service concurrency level or a raw batch size."""

    level: str  # c{N}: N concurrent clients; raw b{N}: the backend at batch size N
    images_per_s: float
    p50_ms: float  # per request (service) or per batch (raw)
    p99_ms: float
    mean_batch: float | None
    errors: int
    answered: int  # requests answered (service) or batches run (raw) in the window
    server_p50_ms: dict[str, float] = field(default_factory=dict)  # from each `timing`
    error_kinds: dict[str, int] = field(default_factory=dict)  # HTTP status -> count
    client_cpu: float | None = None  # cores this benchmark's own clients kept busy


@dataclass
class Answer:
    """One request as a client saw it."""

    done_s: float  # time.perf_counter() when the answer arrived
    latency_s: float
    status: int  # HTTP status; 0 when no answer came (connection error, timeout)
    timing_ms: dict[str, float]


# One request as a client sends it: (client, image, model, check of its answer or None) ->
# what came back. post_detect by default; a server of another protocol brings its own.
Post = Callable[[httpx.AsyncClient, bytes, str, Callable[[dict[str, Any]], bool] | None],
                Awaitable[Answer]]
# (client, metrics URL, model) -> (images, batches) the server has run so far; the mean
# batch of a window is the ratio of their deltas. batch_histogram by default.
BatchCounts = Callable[[httpx.AsyncClient, str | None, str], Awaitable[tuple[float, float]]]


# --- inputs ------------------------------------------------------------------------------
def generated_images() -> list[bytes]:
    """Ten synthetic scenes of varied sizes, JPEG-encoded."""
    from cvserve.models.synthetic import make_scene

    return [make_scene(seed, w, h).jpeg() for seed, (w, h) in enumerate(SCENE_SIZES)]


def folder_images(folder: Path) -> list[bytes]:
    """Every .jpg / .jpeg file in a folder, in name order."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"--images {folder}: no .jpg or .jpeg files there")
    return [p.read_bytes() for p in paths]


def export_random_model(repository: Path, name: str) -> None:
    """The default detector with random weights, as `cvserve models export` writes it."""
    from cvserve.models.export import export_detector

    print(f"exporting {DEFAULT_ARCH} (random weights) as '{name}' into {repository} ...",
          file=sys.stderr)
    export_detector(DEFAULT_ARCH, repository, weights="random", name=name, check=False)


def raw_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4 ... up to max_batch (which is included even when not a power of two)."""
    sizes = [1]
    while sizes[-1] * 2 <= max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


# --- the service -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceSpec:
    """What to start: the cvserve commands, their environment, where to read metrics."""

    commands: list[str]
    env: dict[str, str]
    url: str
    metrics_url: str | None  # None: a server without cvserve's metrics (no batch sizes)
    key_prefix: str | None = None  # Redis mode: every key the processes made starts so


def service_spec(repository: Path, model: str, device: str, redis_url: str | None) -> ServiceSpec:
    """`cvserve run` (embedded), or `cvserve api` + `cvserve worker` over Redis."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "CVSERVE_REDIS_URL"}
    env.update(PYTHONUNBUFFERED="1", CVSERVE_HOST="127.0.0.1", CVSERVE_PORT=str(port),
               CVSERVE_MODEL_REPOSITORY=str(repository), CVSERVE_DEVICE=device,
               # JSON: pydantic-settings reads list fields from the environment as JSON
               CVSERVE_MODELS=json.dumps([model]))
    if redis_url is None:
        return ServiceSpec(["run"], env, url, f"{url}/metrics")
    # The worker's metrics live in the worker process, on a port of its own.
    metrics_port = free_port()
    prefix = f"cvserve-bench-{uuid.uuid4().hex[:10]}"
    env.update(CVSERVE_REDIS_URL=redis_url, CVSERVE_KEY_PREFIX=prefix,
               CVSERVE_WORKER_METRICS_PORT=str(metrics_port))
    return ServiceSpec(["worker", "api"], env, url, f"http://127.0.0.1:{metrics_port}/metrics",
                       key_prefix=prefix)


class Service:
    """The cvserve processes of one benchmark, each logging to its own file."""

    def __init__(self, spec: ServiceSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Service:
        for command in self.spec.commands:
            with (self.log_dir / f"{command}.log").open("wb") as log:  # the child keeps a copy
                self.procs[command] = subprocess.Popen(
                    self.argv(command), env=self.spec.env, stdout=log,
                    stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def argv(self, command: str) -> list[str]:
        """The command line of one process (a subclass may start another server)."""
        return [sys.executable, "-m", "cvserve.app.cli", command]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until /readyz answers 200: the queue is up and a worker serves a detector."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for command, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"cvserve {command} exited with {proc.returncode}:\n"
                                     f"{self.log_tail(command)}")
            try:
                if httpx.get(f"{self.spec.url}/readyz", timeout=2,
                             trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        logs = "\n".join(self.log_tail(c) for c in self.procs)
        raise SystemExit(f"cvserve not ready in {timeout_s:g} s:\n{logs}")

    def log_tail(self, command: str, lines: int = 30) -> str:
        text = (self.log_dir / f"{command}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if that takes longer than timeout_s."""
        for proc in reversed(self.procs.values()):  # the api first, then the worker
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def delete_redis_keys(redis_url: str, prefix: str) -> None:
    """Remove what a Redis-mode run left behind (job streams, groups, registrations)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        r.delete(*keys)
    r.close()


# --- closed-loop clients -----------------------------------------------------------------
async def timed_answer(request: Awaitable[httpx.Response],
                       read: Callable[[httpx.Response], dict[str, Any]],
                       check: Callable[[dict[str, Any]], bool] | None) -> Answer:
    """Time one request; `read` turns a 200 into the answer (ValueError: unreadable), which
    `check` judges. Status 0: no response; WRONG_ANSWER: unreadable or rejected."""
    t0 = time.perf_counter()
    try:
        r = await request
    except httpx.HTTPError:
        t1 = time.perf_counter()
        return Answer(t1, t1 - t0, 0, {})
    t1 = time.perf_counter()
    if r.status_code != 200:
        return Answer(t1, t1 - t0, r.status_code, {})
    try:
        answer = read(r)
    except ValueError:
        return Answer(t1, t1 - t0, WRONG_ANSWER, {})
    status = WRONG_ANSWER if check is not None and not check(answer) else 200
    return Answer(t1, t1 - t0, status, answer.get("timing", {}))


async def post_detect(client: httpx.AsyncClient, data: bytes, model: str,
                      check: Callable[[dict[str, Any]], bool] | None = None) -> Answer:
    request = client.post("/detect", content=data, params={"model": model},
                          headers={"content-type": "image/jpeg"})
    return await timed_answer(request, lambda r: r.json(), check)


async def client_loop(client: httpx.AsyncClient, images: list[bytes], first: int, model: str,
                      stop_s: float, answers: list[Answer], check: Check | None = None,
                      post: Post = post_detect) -> None:
    """One closed-loop client: the next image as soon as the previous answer arrives."""
    for i in itertools.count(first):
        if time.perf_counter() >= stop_s:
            return
        k = i % len(images)
        one = None if check is None else functools.partial(check, k)
        answers.append(await post(client, images[k], model, one))


async def batch_histogram(client: httpx.AsyncClient, metrics_url: str | None,
                          model: str) -> tuple[float, float]:
    """(sum, count) of the worker's batch-size histogram for one model; (0, 0) where
    there are no metrics."""
    if metrics_url is None:
        return 0.0, 0.0
    text = (await client.get(metrics_url)).text
    found = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_METRIC:
            continue
        for sample in family.samples:
            kind = sample.name.removeprefix(f"{BATCH_METRIC}_")
            if kind in found and sample.labels.get("model") == model:
                found[kind] = sample.value
    return found["sum"], found["count"]


async def sleep_until(t_s: float) -> None:
    await asyncio.sleep(max(0.0, t_s - time.perf_counter()))


async def measure_level(spec: ServiceSpec, model: str, images: list[bytes], concurrency: int,
                        warmup_s: float, duration_s: float, check: Check | None = None, *,
                        post: Post = post_detect,
                        batch_counts: BatchCounts = batch_histogram) -> Row:
    """N closed-loop clients; what answered inside the window after the warm-up counts
    (with `check`, an answer it rejects counts as an error, status WRONG_ANSWER). `post`
    sends one request, `batch_counts` reads the server's batch counters."""
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=spec.url, timeout=REQUEST_TIMEOUT_S, limits=limits,
                                 trust_env=False) as client:
        start_s = time.perf_counter() + warmup_s
        stop_s = start_s + duration_s
        answers: list[Answer] = []
        clients = [asyncio.create_task(client_loop(client, images, k, model, stop_s, answers,
                                                   check, post))
                   for k in range(concurrency)]
        await sleep_until(start_s)
        sum0, count0 = await batch_counts(client, spec.metrics_url, model)
        cpu0 = time.process_time()
        await sleep_until(stop_s)
        client_cpu = (time.process_time() - cpu0) / duration_s
        sum1, count1 = await batch_counts(client, spec.metrics_url, model)
        await asyncio.gather(*clients)  # the answers in flight: the next level starts idle
    window = [a for a in answers if start_s <= a.done_s <= stop_s]
    row = service_row(f"c{concurrency}", window, duration_s,
                      (sum1 - sum0) / (count1 - count0) if count1 > count0 else None)
    row.client_cpu = client_cpu
    return row


def service_row(level: str, answers: list[Answer], duration_s: float,
                mean_batch: float | None) -> Row:
    ok = [a for a in answers if a.status == 200]
    latencies_ms = [a.latency_s * 1000 for a in ok]
    server = {part: percentile([a.timing_ms[part] for a in ok if part in a.timing_ms], 50)
              for part in TIMING_PARTS}
    failed = Counter(str(a.status) for a in answers if a.status != 200)
    return Row(level, len(ok) / duration_s, percentile(latencies_ms, 50),
               percentile(latencies_ms, 99), mean_batch, sum(failed.values()), len(ok),
               server, dict(failed))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def smoke_test(spec: ServiceSpec, model: str, images: list[bytes]) -> None:
    """Each image once, one at a time: fail fast on a broken setup, warm every image size."""
    async with httpx.AsyncClient(base_url=spec.url, timeout=REQUEST_TIMEOUT_S,
                                 trust_env=False) as client:
        for i, data in enumerate(images):
            r = await client.post("/detect", content=data, params={"model": model},
                                  headers={"content-type": "image/jpeg"})
            if r.status_code != 200:
                raise SystemExit(f"image {i}: /detect answered {r.status_code}: {r.text}")


def benchmark_service(spec: ServiceSpec, model: str, images: list[bytes],
                      concurrencies: list[int], warmup_s: float, duration_s: float,
                      log_dir: Path) -> list[Row]:
    with Service(spec, log_dir):
        asyncio.run(smoke_test(spec, model, images))
        rows = []
        for n in concurrencies:
            print(f"service c{n}: {warmup_s:g} s warm-up + {duration_s:g} s ...", file=sys.stderr)
            rows.append(asyncio.run(measure_level(spec, model, images, n, warmup_s,
                                                  duration_s)))
    return rows


# --- the raw backend ---------------------------------------------------------------------
def benchmark_raw(model_dir: Path, images: list[bytes], device: str, warmup_s: float,
                  duration_s: float) -> list[Row]:
    """task.run() alone, in this process, on items preprocessed once before timing."""
    from cvserve.app.queue import Job
    from cvserve.app.settings import Settings
    from cvserve.worker.repository import load_config
    from cvserve.worker.server import build_task

    cfg = load_config(model_dir)
    task = build_task(cfg, Settings(device=device))
    items = [task.prepare(Job(model=cfg.name, task=cfg.task, payload=data, deadline_ms=0))
             for data in images]
    # On a model thread of its own, as the worker runs it: called from the main thread the
    # same TorchScript model ran 3-5x slower here (2 busy cores, 2 intra-op threads).
    with ThreadPoolExecutor(1, thread_name_prefix="raw-model") as model_thread:
        return [model_thread.submit(measure_batch_size, task, items, size, warmup_s,
                                    duration_s).result()
                for size in raw_batch_sizes(cfg.batching.max_batch_size)]


def measure_batch_size(task: Task, items: list[Prepared], size: int, warmup_s: float,
                       duration_s: float) -> Row:
    """One raw row: batches of `size` consecutive images (wrapping around), so image
    sizes mix as they do in the service."""
    print(f"raw b{size}: {warmup_s:g} s warm-up + {duration_s:g} s ...", file=sys.stderr)
    distinct = [[items[(start + j) % len(items)] for j in range(size)]
                for start in range(len(items))]
    batches = itertools.cycle(distinct)
    # TorchScript profiles and optimizes its graph over the first runs it sees: warm up on
    # every distinct batch (the service's smoke test does the same for it).
    time_batches(task.run, batches, warmup_s, min_runs=len(distinct))
    latencies_ms = [s * 1000 for s in time_batches(task.run, batches, duration_s)]
    return Row(f"raw b{size}", size * len(latencies_ms) * 1000 / sum(latencies_ms),
               percentile(latencies_ms, 50), percentile(latencies_ms, 99), float(size), 0,
               len(latencies_ms))


def time_batches(run: Callable[[list[Prepared]], Any], batches: Iterator[list[Prepared]],
                 seconds: float, min_runs: int = 1) -> list[float]:
    """Run batches back to back for `seconds` and at least `min_runs` times; each one's
    duration in s."""
    durations: list[float] = []
    stop_s = time.perf_counter() + seconds
    while len(durations) < min_runs or time.perf_counter() < stop_s:
        batch = next(batches)
        t0 = time.perf_counter()
        run(batch)
        durations.append(time.perf_counter() - t0)
    return durations


# --- the report --------------------------------------------------------------------------
def ratios(service: list[Row], raw: list[Row]) -> dict[str, dict[str, Any]]:
    """The issue's two numbers: service at saturation vs the best raw throughput, and the
    latency the service adds at concurrency 1."""
    out: dict[str, dict[str, Any]] = {}
    by_level = {r.level: r for r in [*service, *raw]}
    if service and raw:
        top = max(service, key=lambda r: int(r.level[1:]))  # the highest concurrency
        best = max(raw, key=lambda r: r.images_per_s)
        value = top.images_per_s / best.images_per_s
        out["saturation_throughput_ratio"] = {
            "of": f"{top.level} / {best.level}", "value": value,
            "target": f">= {THROUGHPUT_RATIO_TARGET:.2f}",
            "met": value >= THROUGHPUT_RATIO_TARGET}
    if "c1" in by_level and "raw b1" in by_level:
        value = by_level["c1"].p50_ms - by_level["raw b1"].p50_ms
        out["c1_p50_overhead_ms"] = {
            "of": "c1 p50 - raw b1 p50", "value": value,
            "target": f"<= {C1_OVERHEAD_TARGET_MS:g} ms", "met": value <= C1_OVERHEAD_TARGET_MS}
    return out


def format_table(rows: list[Row]) -> str:
    lines = [f"{'level':<8} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>11} "
             f"{'errors':>7}"]
    for r in rows:
        batch = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        lines.append(f"{r.level:<8} {r.images_per_s:>9.2f} {r.p50_ms:>9.1f} {r.p99_ms:>9.1f} "
                     f"{batch:>11} {r.errors:>7}")
    return "\n".join(lines)


def format_breakdown(rows: list[Row]) -> str:
    """Where a request's time goes: p50 of each part of the answers' `timing`, in ms."""
    head = " ".join(f"{p:>11}" for p in TIMING_PARTS)
    lines = [f"{'level':<8} {head} {'http+api':>9} {'client cpu':>11}"]
    for r in rows:
        parts = " ".join(f"{r.server_p50_ms[p]:>11.1f}" for p in TIMING_PARTS)
        lines.append(f"{r.level:<8} {parts} {r.p50_ms - r.server_p50_ms['total']:>9.1f} "
                     f"{r.client_cpu or 0:>11.2f}")
    return "\n".join(lines)


def format_ratios(found: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, r in found.items():
        verdict = "met" if r["met"] else "NOT met"
        lines.append(f"{name}: {r['value']:.3f}  ({r['of']}; target {r['target']}: {verdict})")
    return "\n".join(lines)


def format_errors(rows: list[Row]) -> str:
    lines = [f"{r.level}: " + ", ".join(f"{n} x status {s}" for s, n in r.error_kinds.items())
             for r in rows if r.error_kinds]
    head = f"errors (status 0: no answer; {WRONG_ANSWER}: wrong detections)"
    return head + "\n" + "\n".join(lines) if lines else ""


# --- command line ------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=None,
                   help="folder of model folders (default: export a random-weight "
                        f"{DEFAULT_ARCH} into a temporary folder)")
    p.add_argument("--model", default="frcnn", help="the model folder's name (default frcnn)")
    p.add_argument("--concurrency", default="1,4,16",
                   help="comma-separated numbers of closed-loop clients (default 1,4,16)")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds measured per level, service and raw alike (default 20)")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="seconds run before each level's measurement (default 3)")
    p.add_argument("--images", type=Path, default=None,
                   help="a folder of JPEGs (default: ten generated scenes of varied sizes)")
    p.add_argument("--device", default="cpu",
                   help="CVSERVE_DEVICE for the service and the raw backend (default cpu)")
    p.add_argument("--redis-url", default=None,
                   help="benchmark Redis mode (`cvserve api` + `cvserve worker`) over this "
                        "Redis on 127.0.0.1")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(n) for n in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency takes numbers like 1,4,16, got '{args.concurrency}'")
    if min(args.concurrency) < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--concurrency must be >= 1, --duration > 0 and --warmup >= 0")
    if args.redis_url and urlsplit(args.redis_url).hostname not in LOOPBACK:
        p.error(f"--redis-url must point at 127.0.0.1 (this benchmark talks to no other "
                f"host), got '{args.redis_url}'")
    return args


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Row], list[Row], int]:
    """Both measurements: (service rows, raw rows, number of images)."""
    repository = args.model_repository
    if repository is None:
        repository = workdir / "models"
        export_random_model(repository, args.model)
    repository = repository.resolve()
    if not (repository / args.model / "model.toml").is_file():
        raise SystemExit(f"no model '{args.model}' in {repository} (no "
                         f"{args.model}/model.toml there); `cvserve models list` shows them")
    images = folder_images(args.images) if args.images else generated_images()
    spec = service_spec(repository, args.model, args.device, args.redis_url)
    try:
        service = benchmark_service(spec, args.model, images, args.concurrency, args.warmup,
                                    args.duration, workdir)
    finally:
        if spec.key_prefix is not None:
            delete_redis_keys(args.redis_url, spec.key_prefix)
    raw = benchmark_raw(repository / args.model, images, args.device, args.warmup,
                        args.duration)
    return service, raw, len(images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cvserve-bench-") as tmp:
        service, raw, n_images = run(args, Path(tmp))
    mode = "redis" if args.redis_url else "embedded"
    found = ratios(service, raw)
    print(f"\n/detect, model {args.model} ({mode}, {args.device}, {n_images} images, "
          f"{args.duration:g} s per level, {os.cpu_count()} cores)")
    print(format_table([*service, *raw]))
    print(f"\nserver-side p50 ms (each answer's `timing`; http+api = client p50 - total)\n"
          f"{format_breakdown(service)}")
    print(f"\n{format_ratios(found)}")
    if errors := format_errors(service):
        print(f"\n{errors}")
    if args.out is not None:
        report = {"mode": mode, "model": args.model, "device": args.device,
                  "model_repository": str(args.model_repository or "temporary export"),
                  "cores": os.cpu_count(), "images": n_images, "warmup_s": args.warmup,
                  "duration_s": args.duration, "rows": [asdict(r) for r in [*service, *raw]],
                  "ratios": found}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare serving stacks on one model, side by side in one run (../shared/PERF.md).

One invocation, one model, each stack alone on the machine (never two at once):

1. backend alone: the model in this process, images preprocessed once, `task.run` back to
   back at batch 1, 2, 4 ... max_batch_size (detect_bench.benchmark_raw);
2. plain server: bench/plain_server.py, FastAPI + uvicorn, one model call per request;
3. cvserve embedded: `cvserve run`;
4. cvserve redis: `cvserve api` + `cvserve worker` over --redis-url (keys deleted after);
5. cvserve unbatched (--unbatched-too): `cvserve run` on a copy of the model with
   max_batch_size = 1;
6. Triton (PyTriton, dynamic batching 16 / 5 ms): bench/triton_server.py, the same stages
   in Triton's batches, KServe v2 requests with binary data (skipped without PyTriton).

Every answer is checked against the detections the task itself gives for that image,
computed in this process before any server starts; a mismatch counts as an error.

    python bench/compare.py --yolox ../shared/models --duration 3 --warmup 1 --concurrency 1,4
    python bench/compare.py --yolox ../shared/models --stacks plain,triton
    python bench/compare.py --frcnn --unbatched-too --out frcnn.json
    python bench/compare.py --model-repository models --model demo-detector

bench/README.md says what each column and ratio means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from detect_bench import (
    LOOPBACK,
    READY_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    Answer,
    BatchCounts,
    Check,
    Post,
    Row,
    Service,
    ServiceSpec,
    batch_histogram,
    benchmark_raw,
    delete_redis_keys,
    export_random_model,
    folder_images,
    format_breakdown,
    format_errors,
    format_table,
    free_port,
    generated_images,
    measure_level,
    post_detect,
    service_spec,
    smoke_test,
    timed_answer,
)
from prometheus_client.parser import text_string_to_metric_families
from triton_server import HEADER_LENGTH, infer_answer, infer_request

PLAIN_SERVER = Path(__file__).resolve().parent / "plain_server.py"
TRITON_SERVER = Path(__file__).resolve().parent / "triton_server.py"
# As ../shared/PERF.md measured Triton: batches of up to 16 requests, 5 ms queue delay.
TRITON_MAX_BATCH = 16
TRITON_QUEUE_DELAY_MS = 5.0
# Triton's counters (port 8002 by default): images inferred, model executions.
TRITON_IMAGES, TRITON_BATCHES = "nv_inference_count", "nv_inference_exec_count"
STACKS = ("backend", "plain", "embedded", "redis", "unbatched", "triton")
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "testdata"
SCORE_TOLERANCE = 0.02
BOX_TOLERANCE_PX = 3.0
# The performance issue's targets (bench/README.md).
VS_PLAIN_TARGET = 1.0  # cvserve embedded c16 / plain server c16
VS_TRITON_TARGET = 1.3  # cvserve embedded c16 / Triton c16
C1_P50_GAP_TARGET_MS = 3.0  # cvserve embedded c1 p50 - plain server c1 p50
REDIS_TARGET = 0.9  # cvserve redis c16 / cvserve embedded c16
BATCHING_TARGET = 1.5  # cvserve embedded c16 / unbatched c16, for R-CNN detectors


@dataclass
class Stack:
    """One serving stack's rows, or why it has none."""

    name: str
    rows: list[Row] = field(default_factory=list)
    note: str = ""  # skipped: ..., failed: ...
    policy: dict[str, Any] = field(default_factory=dict)  # cvserve: the batching policy

    def at(self, level: str) -> Row | None:
        return next((r for r in self.rows if r.level == level), None)


# --- the model and the expected answers --------------------------------------------------
def prepare_model(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """(repository, model name) of the model to compare, installing it when asked."""
    if args.yolox is not None:
        from cvserve.models.catalog import install

        repository, name = workdir / "models", "yolox-nano"
        install(name, repository, args.yolox.resolve(), download=False)
    elif args.frcnn:
        repository, name = workdir / "models", "frcnn"
        export_random_model(repository, name)
    else:
        repository, name = args.model_repository.resolve(), args.model
    if not (repository / name / "model.toml").is_file():
        raise SystemExit(f"no model '{name}' in {repository} (no {name}/model.toml there)")
    return repository, name


def unbatched_copy(repository: Path, name: str, workdir: Path) -> Path:
    """A repository holding a copy of the model with max_batch_size = 1. -> its root."""
    target = workdir / "unbatched" / name
    shutil.copytree(repository / name, target)
    toml = target / "model.toml"
    text = toml.read_text()
    # Rewrite the line inside [batching] (up to the next table), or add it there.
    table = re.search(r"^\[batching\][^\[]*", text, flags=re.M)
    if table is None:
        text += "\n[batching]\nmax_batch_size = 1\n"
    else:
        body, n = re.subn(r"^max_batch_size\s*=.*$", "max_batch_size = 1", table.group(),
                          flags=re.M)
        body = body if n else body.replace("[batching]", "[batching]\nmax_batch_size = 1", 1)
        text = text[:table.start()] + body + text[table.end():]
    if tomllib.loads(text).get("batching", {}).get("max_batch_size") != 1:
        raise SystemExit(f"could not set max_batch_size = 1 in {toml}:\n{text}")
    toml.write_text(text)
    return target.parent


def expected_answers(model_dir: Path, images: list[bytes], device: str) -> list[dict]:
    """Each image's answer from the task itself, one image at a time: {detections, image}."""
    from cvserve.app.queue import Job
    from cvserve.app.settings import Settings
    from cvserve.worker.repository import load_config
    from cvserve.worker.server import build_task

    cfg = load_config(model_dir)
    task = build_task(cfg, Settings(device=device))

    def answer(data: bytes) -> dict:
        item = task.prepare(Job(model=cfg.name, task=cfg.task, payload=data, deadline_ms=0))
        [output] = task.run([item])
        return task.finish(item, output)[0]

    # On a thread of its own, as benchmark_raw and the worker run the model.
    with ThreadPoolExecutor(1, thread_name_prefix="expected") as thread:
        return list(thread.map(answer, images))


def same_detection(a: dict, b: dict) -> bool:
    return (a["label"] == b["label"] and abs(a["score"] - b["score"]) <= SCORE_TOLERANCE
            and all(abs(a["box"][k] - b["box"][k]) <= BOX_TOLERANCE_PX for k in a["box"]))


def detections_match(got: list[dict], want: list[dict], threshold: float) -> bool:
    """Every detection has a counterpart on the other side (same label, score within
    SCORE_TOLERANCE, each box edge within BOX_TOLERANCE_PX), except ones scored within the
    tolerance of the threshold, which may fall either side of it."""
    if len(got) == len(want) and all(map(same_detection, got, want)):
        return True  # the usual case: the same detections in the same order
    near = threshold + SCORE_TOLERANCE
    left = list(got)
    for w in want:
        k = next((i for i, g in enumerate(left) if same_detection(g, w)), None)
        if k is not None:
            left.pop(k)
        elif w["score"] >= near:
            return False
    return all(g["score"] < near for g in left)


def answer_check(expected: list[dict], threshold: float) -> Check:
    """The check measure_level applies to each answer: the image size and detections."""
    def check(index: int, answer: dict[str, Any]) -> bool:
        want = expected[index]
        return (answer.get("image") == want["image"]
                and detections_match(answer.get("detections", []), want["detections"],
                                     threshold))
    return check


# --- the stacks --------------------------------------------------------------------------
class PlainServer(Service):
    """bench/plain_server.py as one process, started, awaited and stopped like cvserve."""

    def __init__(self, spec: ServiceSpec, log_dir: Path, repository: Path, model: str) -> None:
        super().__init__(spec, log_dir)
        self.args = ["--model-repository", str(repository), "--model", model,
                     "--port", str(urlsplit(spec.url).port)]

    def argv(self, command: str) -> list[str]:
        return [sys.executable, str(PLAIN_SERVER), *self.args]


class TritonServer(Service):
    """bench/triton_server.py: PyTriton starts tritonserver and serves the model through it.
    Ready when Triton says the model is; answers KServe v2 (post_triton)."""

    def __init__(self, spec: ServiceSpec, log_dir: Path, repository: Path, model: str,
                 python: str) -> None:
        super().__init__(spec, log_dir)
        self.model = model
        self.python = python
        self.args = ["--model-repository", str(repository), "--model", model,
                     "--http-port", str(urlsplit(spec.url).port),
                     "--grpc-port", str(free_port()),
                     "--metrics-port", str(urlsplit(spec.metrics_url or "").port),
                     "--max-batch-size", str(TRITON_MAX_BATCH),
                     "--max-queue-delay-ms", f"{TRITON_QUEUE_DELAY_MS:g}"]

    def argv(self, command: str) -> list[str]:
        return [self.python, str(TRITON_SERVER), *self.args]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until Triton's model readiness answers 200 (tritonserver up, the model loaded)."""
        url = f"{self.spec.url}/v2/models/{self.model}/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs["triton"]
            if proc.poll() is not None:
                raise SystemExit(f"triton_server.py exited with {proc.returncode}:\n"
                                 f"{self.log_tail('triton')}")
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"Triton not ready in {timeout_s:g} s:\n{self.log_tail('triton')}")


async def post_triton(client: httpx.AsyncClient, data: bytes, model: str,
                      check: Callable[[dict[str, Any]], bool] | None = None) -> Answer:
    """One image as a KServe v2 infer request (binary data: the raw image bytes follow the
    JSON header), as post_detect sends it to /detect; an answer that cannot be read counts
    as a wrong one."""
    body, headers = infer_request(data)
    request = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    return await timed_answer(
        request, lambda r: infer_answer(r.content, r.headers.get(HEADER_LENGTH)), check)


async def triton_batch_counts(client: httpx.AsyncClient, metrics_url: str | None,
                              model: str) -> tuple[float, float]:
    """(images inferred, model executions) so far, from Triton's metrics."""
    if metrics_url is None:
        return 0.0, 0.0
    found = {TRITON_IMAGES: 0.0, TRITON_BATCHES: 0.0}
    for family in text_string_to_metric_families((await client.get(metrics_url)).text):
        if family.name in found:
            found[family.name] = sum(s.value for s in family.samples
                                     if s.labels.get("model") == model)
    return found[TRITON_IMAGES], found[TRITON_BATCHES]


async def triton_smoke_test(spec: ServiceSpec, model: str, images: list[bytes]) -> None:
    """smoke_test for Triton: each image once, one at a time, fail fast on an error."""
    async with httpx.AsyncClient(base_url=spec.url, timeout=REQUEST_TIMEOUT_S,
                                 trust_env=False) as client:
        for i, data in enumerate(images):
            body, headers = infer_request(data)
            r = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            if r.status_code != 200:
                raise SystemExit(f"image {i}: Triton answered {r.status_code}: {r.text}")
            infer_answer(r.content, r.headers.get(HEADER_LENGTH))


def triton_note(python: str) -> str | None:
    """Why the Triton stack cannot run with this interpreter, or None when it can."""
    try:
        probe = subprocess.run(
            [python, "-c", "import pytriton, numpy; print(numpy.__version__)"],
            capture_output=True, text=True, timeout=120)
    except OSError as exc:
        return f"skipped: cannot run {python} ({exc})"
    if probe.returncode != 0:
        return (f"skipped: pytriton not installed for {python} (in a venv: pip install "
                "-e '.[triton]', then --triton-python VENV/bin/python; bench/README.md)")
    numpy_version = probe.stdout.split()[-1]
    if int(numpy_version.split(".")[0]) >= 2:
        return (f"skipped: numpy {numpy_version} for {python}; PyTriton's "
                "tritonserver stub needs numpy < 2 (--triton-python of a venv that has it)")
    return None


def measure_stack(stack: Stack, server: Service, model: str, images: list[bytes],
                  check: Check, args: argparse.Namespace, *,
                  smoke: Callable[[ServiceSpec, str, list[bytes]], Awaitable[None]] = smoke_test,
                  post: Post = post_detect,
                  batch_counts: BatchCounts = batch_histogram) -> Stack:
    """Start the server, send each image once, then each concurrency level; a server that
    fails to start or answer is reported as failed, and the next stack runs. The server's
    protocol: `smoke`, `post` and `batch_counts` (cvserve's /detect by default)."""
    server.log_dir.mkdir(parents=True)
    try:
        with server:
            asyncio.run(smoke(server.spec, model, images))
            if stack.name.startswith("cvserve"):  # what its warm-up chose
                stack.policy = httpx.get(f"{server.spec.url}/models/{model}",
                                         timeout=10).json().get("batching_policy", {})
            for n in args.concurrency:
                print(f"{stack.name} c{n}: {args.warmup:g} s warm-up + {args.duration:g} s ...",
                      file=sys.stderr)
                stack.rows.append(asyncio.run(measure_level(
                    server.spec, model, images, n, args.warmup, args.duration, check,
                    post=post, batch_counts=batch_counts)))
    except SystemExit as exc:
        print(f"{stack.name}: {exc}", file=sys.stderr)
        stack.note = f"failed: {str(exc).splitlines()[0]}"
    return stack


def redis_note(url: str) -> str | None:
    """Why Redis mode cannot run, or None when the Redis answers."""
    try:
        with redis.Redis.from_url(url, socket_timeout=2) as r:
            r.ping()
    except redis.RedisError as exc:
        return f"skipped: no Redis at {url} ({exc})"
    return None


def run_stacks(args: argparse.Namespace, workdir: Path, repository: Path, name: str,
               images: list[bytes], check: Check, max_batch: int) -> list[Stack]:
    """Each stack of --stacks in turn, alone on the machine: backend, plain, cvserve's
    modes, Triton."""
    def serve(stack: Stack, server: Service, **protocol: Any) -> Stack:
        return measure_stack(stack, server, name, images, check, args, **protocol)

    def cvserve(repo: Path, redis_url: str | None = None) -> ServiceSpec:
        return service_spec(repo, name, args.device, redis_url)

    stacks = []
    if "backend" in args.stacks:
        stacks.append(Stack("backend alone", benchmark_raw(
            repository / name, images, args.device, args.warmup, args.duration)))
    if "plain" in args.stacks:
        plain_spec = cvserve(repository)
        plain_spec.commands, plain_spec.metrics_url = ["plain"], None
        plain = serve(Stack("plain server"),
                      PlainServer(plain_spec, workdir / "plain", repository, name))
        for row in plain.rows:
            row.mean_batch = 1.0  # one model call per request, by construction
        stacks.append(plain)
    if "embedded" in args.stacks:
        stacks.append(serve(Stack("cvserve embedded"),
                            Service(cvserve(repository), workdir / "embedded")))

    if "redis" in args.stacks:
        redis_stack = Stack("cvserve redis", note=redis_note(args.redis_url) or "")
        if not redis_stack.note:
            spec = cvserve(repository, args.redis_url)
            try:
                serve(redis_stack, Service(spec, workdir / "redis"))
            finally:
                if spec.key_prefix:  # never an empty prefix: that would match every key
                    delete_redis_keys(args.redis_url, spec.key_prefix)
        stacks.append(redis_stack)

    if "unbatched" in args.stacks:
        unbatched = Stack("cvserve unbatched")
        if max_batch > 1:
            copy = unbatched_copy(repository, name, workdir)
            serve(unbatched, Service(cvserve(copy), workdir / "unbatched-logs"))
        else:
            unbatched.note = "skipped: the model's max_batch_size is already 1"
        stacks.append(unbatched)

    if "triton" in args.stacks:
        triton = Stack("triton (pytriton)", note=triton_note(args.triton_python) or "")
        if not triton.note:
            # The same environment as the others (CVSERVE_DEVICE ...); Triton's own ports.
            spec = cvserve(repository)
            spec.commands = ["triton"]
            spec.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
            serve(triton, TritonServer(spec, workdir / "triton", repository, name,
                                       args.triton_python),
                  smoke=triton_smoke_test, post=post_triton, batch_counts=triton_batch_counts)
        stacks.append(triton)
    return stacks


def side_by_side(args: argparse.Namespace, logs: Path, repository: Path, name: str
                 ) -> tuple[PlainServer, Service]:
    """The plain server and cvserve embedded, not yet started, to run at once (their logs
    under `logs`)."""
    plain_spec = service_spec(repository, name, args.device, None)
    plain_spec.commands, plain_spec.metrics_url = ["plain"], None
    plain = PlainServer(plain_spec, logs / "plain", repository, name)
    ours = Service(service_spec(repository, name, args.device, None), logs / "embedded")
    for server in (plain, ours):
        server.log_dir.mkdir(parents=True)
    return plain, ours


def interleaved_c1(args: argparse.Namespace, workdir: Path, repository: Path, name: str,
                   images: list[bytes], check: Check) -> dict[str, Any]:
    """The plain server and cvserve embedded up at once, one request to each in turn for
    --c1-ab seconds: at concurrency 1 the machine's drift between two levels run minutes
    apart is larger than the 3 ms being judged, and alternating cancels it."""
    plain, ours = side_by_side(args, workdir / "ab", repository, name)
    latencies: dict[str, list[float]] = {"plain": [], "cvserve": []}
    errors = 0
    print(f"interleaved c1: plain and cvserve embedded, {args.c1_ab:g} s ...", file=sys.stderr)
    with plain, ours, httpx.Client(base_url=plain.spec.url, timeout=60) as a, \
            httpx.Client(base_url=ours.spec.url, timeout=60) as b:
        clients = {"plain": a, "cvserve": b}
        end, i = time.monotonic() + args.c1_ab + args.warmup, 0
        while time.monotonic() < end:
            data = images[i % len(images)]
            for who, client in clients.items():
                t0 = time.perf_counter()
                r = client.post("/detect", content=data, params={"model": name},
                                headers={"content-type": "image/jpeg"})
                if time.monotonic() > end - args.c1_ab:  # past the warm-up
                    latencies[who].append((time.perf_counter() - t0) * 1000)
                errors += r.status_code != 200 or not check(i % len(images), r.json())
            i += 1
    p50 = {who: statistics.median(v) for who, v in latencies.items()}
    value = p50["cvserve"] - p50["plain"]
    return {"of": f"cvserve p50 {p50['cvserve']:.1f} - plain p50 {p50['plain']:.1f} ms, "
                  f"{len(latencies['plain'])} pairs, {errors} errors, interleaved",
            "value": value, "target": f"<= {C1_P50_GAP_TARGET_MS:g}",
            "met": value <= C1_P50_GAP_TARGET_MS}


def interleaved_rounds(args: argparse.Namespace, workdir: Path, repository: Path, name: str,
                       images: list[bytes], check: Check) -> dict[str, Any]:
    """The plain server and cvserve embedded up at once, measured in turn at the top
    concurrency for --ab-rounds pairs of --duration seconds, the order of each pair
    alternating (plain first, then cvserve first, ...). Stacks measured minutes apart
    differ by the machine's drift (5-30 %, ../shared/PERF.md), as much as the margin
    being judged; each pair's ratio sees the same machine, and the spread of the ratios
    says whether the margin is more than noise."""
    top = max(args.concurrency)
    plain, ours = side_by_side(args, workdir / "rounds", repository, name)
    servers: dict[str, Service] = {"plain": plain, "cvserve": ours}
    pairs: list[dict[str, Row]] = []
    with plain, ours:
        for server in servers.values():
            asyncio.run(smoke_test(server.spec, name, images))
        for k in range(args.ab_rounds):
            order = ["plain", "cvserve"] if k % 2 == 0 else ["cvserve", "plain"]
            pair = {}
            for who in order:
                print(f"round {k + 1}/{args.ab_rounds}, {who} c{top}: {args.warmup:g} s "
                      f"warm-up + {args.duration:g} s ...", file=sys.stderr)
                pair[who] = asyncio.run(measure_level(
                    servers[who].spec, name, images, top, args.warmup, args.duration, check))
            pairs.append(pair)
    by_round = [p["cvserve"].images_per_s / p["plain"].images_per_s for p in pairs]
    plain_rates = ", ".join(f"{p['plain'].images_per_s:.1f}" for p in pairs)
    value = statistics.median(by_round)
    errors = sum(r.errors for p in pairs for r in p.values())
    return {"of": f"cvserve embedded c{top} / plain server c{top}, {len(pairs)} alternating "
                  f"pairs of {args.duration:g} s: each pair "
                  f"{', '.join(f'{x:.3f}' for x in by_round)}; plain "
                  f"{plain_rates} img/s; "
                  f"cvserve won {sum(x > 1 for x in by_round)} of {len(pairs)}; "
                  f"{errors} errors; the median",
            "value": value, "target": f">= {VS_PLAIN_TARGET:g}",
            "met": value >= VS_PLAIN_TARGET and errors == 0,
            "rounds": [{who: asdict(row) for who, row in p.items()} for p in pairs]}


# --- the report --------------------------------------------------------------------------
def ratios(stacks: list[Stack], concurrency: list[int], rcnn: bool) -> dict[str, dict]:
    """The issue's numbers, each {of, value (None when not measured), target, met}."""
    by_name = {s.name: s for s in stacks}
    top, low = f"c{max(concurrency)}", f"c{min(concurrency)}"

    def row(stack: str, level: str) -> Row | None:
        return by_name[stack].at(level) if stack in by_name else None

    def ratio(a: tuple[str, str], b: tuple[str, str], target: float | None,
              of_key: str = "images_per_s", diff: bool = False) -> dict[str, Any]:
        ra, rb = row(*a), row(*b)
        value = None
        if ra is not None and rb is not None:
            x, y = getattr(ra, of_key), getattr(rb, of_key)
            value = x - y if diff else (x / y if y else None)
        met = None if value is None or target is None else (
            value <= target if diff else value >= target)
        sign = "-" if diff else "/"
        return {"of": f"{a[0]} {a[1]} {sign} {b[0]} {b[1]}", "value": value,
                "target": None if target is None else f"{'<=' if diff else '>='} {target:g}",
                "met": met}

    out = {
        "embedded_vs_plain": ratio(("cvserve embedded", top), ("plain server", top),
                                   VS_PLAIN_TARGET),
        "embedded_vs_triton": ratio(("cvserve embedded", top), ("triton (pytriton)", top),
                                    VS_TRITON_TARGET),
        "redis_vs_embedded": ratio(("cvserve redis", top), ("cvserve embedded", top),
                                   REDIS_TARGET),
        "c1_p50_gap_ms": ratio(("cvserve embedded", low), ("plain server", low),
                               C1_P50_GAP_TARGET_MS, of_key="p50_ms", diff=True),
        "embedded_vs_backend_b1": ratio(("cvserve embedded", top), ("backend alone", "raw b1"),
                                        None),
    }
    if "cvserve unbatched" in by_name:
        out["embedded_vs_unbatched"] = ratio(("cvserve embedded", top),
                                             ("cvserve unbatched", top),
                                             BATCHING_TARGET if rcnn else None)
    return out


def format_stacks(stacks: list[Stack]) -> str:
    """detect_bench's table with a stack column in front."""
    width = max(len(s.name) for s in stacks) + 2
    header = format_table([]).splitlines()[0]
    lines = [f"{'stack':<{width}}{header}"]
    for s in stacks:
        lines += [f"{s.name:<{width}}{line}" for line in format_table(s.rows).splitlines()[1:]]
        if s.note:
            lines.append(f"{s.name:<{width}}{s.note}")
    return "\n".join(lines)


def format_ratios(found: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, r in found.items():
        value = "not measured" if r["value"] is None else f"{r['value']:.3f}"
        verdict = ("" if r["target"] is None else
                   f"; target {r['target']}: " + {True: "met", False: "NOT met",
                                                  None: "unknown"}[r["met"]])
        lines.append(f"{name}: {value}  ({r['of']}{verdict})")
    return "\n".join(lines)


def report(args: argparse.Namespace, name: str, stacks: list[Stack], found: dict,
           expected: list[dict]) -> None:
    print(f"\n/detect, model {name} ({args.device}, {len(expected)} images, "
          f"{args.duration:g} s per level, {os.cpu_count()} cores; every answer checked: "
          f"{sum(len(e['detections']) for e in expected)} expected detections in all)")
    if stacks:
        print(format_stacks(stacks))
    for s in stacks:
        if s.name.startswith("cvserve") and s.rows:
            print(f"\n{s.name}: server-side p50 ms (http+api = client p50 - total)\n"
                  f"{format_breakdown(s.rows)}")
            if p := s.policy:
                print(f"policy: batches up to {p.get('max_batch_size')}, queue delay "
                      f"{p.get('max_queue_delay_ms')} ms, {p.get('instances')} instance(s) "
                      f"({p.get('source')}); warm-up images/s by batch {p.get('throughput')}, "
                      f"by instances {p.get('instance_throughput')}")
    print(f"\n{format_ratios(found)}")
    for s in stacks:
        if errors := format_errors(s.rows):
            print(f"\n{s.name} {errors}")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "model": name, "device": args.device, "cores": os.cpu_count(),
            "images": len(expected), "warmup_s": args.warmup, "duration_s": args.duration,
            "expected": expected, "ratios": found,
            "stacks": {s.name: {"rows": [asdict(r) for r in s.rows], "note": s.note,
                                "policy": s.policy} for s in stacks}}, indent=2) + "\n")
        print(f"\nwrote {args.out}")


# --- command line ------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-repository", type=Path,
                       help="folder of model folders (with --model)")
    model.add_argument("--yolox", type=Path, metavar="MIRROR_DIR",
                       help="install yolox-nano from this mirror into a temporary repository")
    model.add_argument("--frcnn", action="store_true",
                       help="export fasterrcnn_mobilenet_v3_large_320_fpn, random weights")
    p.add_argument("--model", help="the model folder's name (with --model-repository)")
    p.add_argument("--images", type=Path, default=None,
                   help=f"a folder of JPEGs (default: {DEFAULT_IMAGES} if there, else ten "
                        "generated scenes)")
    p.add_argument("--concurrency", default="1,4,16",
                   help="comma-separated numbers of closed-loop clients (default 1,4,16)")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds measured per level (default 20)")
    p.add_argument("--warmup", type=float, default=3.0,
                   help="seconds run before each level's measurement (default 3)")
    p.add_argument("--device", default="cpu", help="CVSERVE_DEVICE everywhere (default cpu)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                   help="the Redis for `cvserve redis` (default redis://127.0.0.1:6379/0)")
    p.add_argument("--unbatched-too", action="store_true",
                   help="also run cvserve embedded with max_batch_size = 1")
    p.add_argument("--stacks", default=",".join(s for s in STACKS if s != "unbatched"),
                   help=f"comma-separated stacks to run, of {','.join(STACKS)} (default: all "
                        "but unbatched, which --unbatched-too adds; '' with --c1-ab or "
                        "--ab-rounds runs only those)")
    p.add_argument("--c1-ab", type=float, default=0, metavar="SECONDS",
                   help="also run the plain server and cvserve embedded side by side, "
                        "alternating single requests, for SECONDS (the c1 p50 gap)")
    p.add_argument("--ab-rounds", type=int, default=0, metavar="N",
                   help="also run the plain server and cvserve embedded side by side, "
                        "measuring each in turn at the top concurrency, N pairs of "
                        "--duration seconds (the c16 ratio, paired against drift)")
    p.add_argument("--triton-python", default=sys.executable,
                   help="the Python that runs bench/triton_server.py, e.g. a venv's with "
                        "PyTriton (default: this one)")
    p.add_argument("--out", type=Path, default=None, help="also write everything as JSON")
    args = p.parse_args(argv)
    if (args.model_repository is None) != (args.model is None):
        p.error("--model-repository and --model NAME go together")
    try:
        args.concurrency = [int(n) for n in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency takes numbers like 1,4,16, got '{args.concurrency}'")
    if (min(args.concurrency) < 1 or args.duration <= 0 or args.warmup < 0
            or args.ab_rounds < 0):
        p.error("--concurrency must be >= 1, --duration > 0, --warmup and --ab-rounds >= 0")
    args.stacks = {s.strip() for s in args.stacks.split(",") if s.strip()}
    if unknown := args.stacks - set(STACKS):
        p.error(f"--stacks: unknown {', '.join(sorted(unknown))}; the stacks are "
                f"{','.join(STACKS)}")
    if not args.stacks and not (args.c1_ab or args.ab_rounds):
        p.error(f"--stacks: name at least one of {','.join(STACKS)} (none only with "
                "--c1-ab or --ab-rounds)")
    if args.unbatched_too:
        args.stacks.add("unbatched")
    if urlsplit(args.redis_url).hostname not in LOOPBACK:
        p.error(f"--redis-url must point at 127.0.0.1, got '{args.redis_url}'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cvserve.worker.repository import load_config

    if args.images is not None:
        images = folder_images(args.images)
    elif DEFAULT_IMAGES.is_dir():
        images = folder_images(DEFAULT_IMAGES)
    else:
        images = generated_images()
    with tempfile.TemporaryDirectory(prefix="cvserve-compare-") as tmp:
        workdir = Path(tmp)
        repository, name = prepare_model(args, workdir)
        cfg = load_config(repository / name)
        print(f"expected answers: {name} on {len(images)} images ...", file=sys.stderr)
        expected = expected_answers(repository / name, images, args.device)
        check = answer_check(expected, cfg.thresholds.score_threshold)
        stacks = run_stacks(args, workdir, repository, name, images, check,
                            cfg.batching.max_batch_size)
        interleaved = (interleaved_c1(args, workdir, repository, name, images, check)
                       if args.c1_ab else None)
        rounds = (interleaved_rounds(args, workdir, repository, name, images, check)
                  if args.ab_rounds else None)
    found = ratios(stacks, args.concurrency, cfg.input.resize == "rcnn")
    if interleaved is not None:
        found["c1_p50_gap_interleaved_ms"] = interleaved
    if rounds is not None:
        found["embedded_vs_plain_paired"] = rounds
    report(args, name, stacks, found, expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())

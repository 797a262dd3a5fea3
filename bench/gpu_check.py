"""GPU check of the TorchScript path: the model alone, then the service end to end, one table.

bench/gpu_check.sh runs this after the tests (it also makes `import cvserve` work on a
machine where the project is not installed). Alone:

    python bench/gpu_check.py --out gpu_out                  # on a GPU
    python bench/gpu_check.py --cpu-dry-run --out /tmp/out   # the logic, on the CPU, tiny

1. export: fasterrcnn_resnet50_fpn, random weights, torchvision's score floor (0.05), as
   TorchScript with this machine's torch. Why this detector: a ResNet-50 FPN at 800 px is
   heavy enough per image that a GPU is worth it, and its per-image overheads (RPN, RoI
   heads, NMS: many small kernels) are what batching amortizes. Why the 0.05 floor: a
   random network scores every box ~1/91, so none passes it, while a trained one passes a
   few hundred into one NMS (a small cost); at floor 0 all 91k boxes would pass and take
   torchvision's per-class NMS loop, a cost no trained model has.
2. the model alone: `task.run` on items prepared once (on the GPU where the task does
   that), batches of 1, 2, 4, 8, 16 of one padded shape, fp32 then fp16.
3. end to end: `cvserve run` on this device, closed-loop HTTP clients at concurrency 1
   and 16, for the same model with max_batch_size 16 (max_queue_delay_ms 5) and 1.
   Images: JPEG scenes of one aspect ratio (4:3) in eight resolutions, which share one
   batch key (docs/design.md §9), as a camera feed's would.
4. the table and three numbers: batching gain at c16 (target >= 3x), end-to-end c16 over
   the best model-alone throughput (target >= 0.7), p50 at c1. JSON and logs in --out.

Everything runs within --budget-s (optional configurations are skipped, saying so, when
time runs short) and every process it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ARCH = "fasterrcnn_resnet50_fpn"
DRY_ARCH = "tiny_fasterrcnn"  # the demo detector: exports in seconds on a CPU
FOUR_THREE = ((640, 480), (800, 600), (1024, 768), (320, 240), (512, 384), (960, 720),
              (400, 300), (1280, 960))  # width, height
BATCH_METRIC = "cvserve_inference_batch_size"
GAIN_TARGET = 3.0
E2E_TARGET = 0.7


@dataclass
class Plan:
    """Sizes and durations: the GPU run, or a dry run that only exercises the logic."""

    device: str
    arch: str
    weights: str
    batch_sizes: list[int]
    max_batch: int
    scenes: tuple[tuple[int, int], ...]
    alone_warmup_s: float
    alone_s: float
    warmup_s: float
    c1_s: float
    c16_s: float


def make_plan(dry_run: bool, arch: str = ARCH) -> Plan:
    if dry_run:
        from cvserve.models.export import DEMO_WEIGHTS

        return Plan("cpu", DRY_ARCH, str(DEMO_WEIGHTS), [1, 2, 4], 4,
                    ((640, 480), (320, 240), (400, 300)), 0.2, 0.5, 0.5, 1.0, 1.5)
    return Plan("cuda", arch, "random", [1, 2, 4, 8, 16], 16, FOUR_THREE, 1.0, 2.5, 3.0, 5.0,
                8.0)


@dataclass
class Row:
    """One line of the table."""

    what: str
    images_per_s: float = float("nan")
    p50_ms: float = float("nan")  # per request (service) or per batch (alone)
    p99_ms: float = float("nan")
    mean_batch: float | None = None
    errors: int = 0
    note: str = ""
    server_p50_ms: dict[str, float] = field(default_factory=dict)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- 1. export ---------------------------------------------------------------------------
def export(plan: Plan, repository: Path) -> Path:
    """The detector, as `cvserve models export` writes it (checked against eager torch)."""
    from cvserve.models.export import export_detector

    floor = 0.05 if plan.weights == "random" else None
    return export_detector(plan.arch, repository, weights=plan.weights, fmt="torchscript",
                           name="det", score_floor=floor, check=plan.device == "cpu")


def variant(base: Path, name: str, max_batch: int, allow_fp16: bool | None = None,
            instances: int | None = None) -> str:
    """A model folder sharing `base`'s artifact, with batching as written (a fixed policy:
    the comparison is of batch sizes, not of the warm-up's choice), and fp16 consent or an
    instance count where this checkout's model.toml schema has those fields."""
    from cvserve.models.export import write_model_toml
    from cvserve.worker.repository import BatchingSpec

    folder = base.parent / name
    folder.mkdir()
    for f in base.iterdir():
        if f.name != "model.toml":
            (folder / f.name).symlink_to(f)
    toml = tomllib.loads((base / "model.toml").read_text())
    top = {k: v for k, v in toml.items() if not isinstance(v, dict)}
    sections = {k: v for k, v in toml.items() if isinstance(v, dict)}
    batching: dict[str, Any] = {"max_batch_size": max_batch,
                                "max_queue_delay_ms": 5.0 if max_batch > 1 else 0.0}
    if "policy" in BatchingSpec.model_fields:
        batching["policy"] = "fixed"
    if instances is not None:
        batching["instances"] = instances
    sections["batching"] = batching
    if allow_fp16 is not None:
        top["allow_fp16"] = allow_fp16
    write_model_toml(folder / "model.toml", top, sections)
    return name


def fp16_safe(arch: str) -> bool:
    """Whether the exporter lets this architecture run in fp16 (models/export.py)."""
    from cvserve.models import export

    return arch in getattr(export, "FP16_SAFE", ())


def scenes(plan: Plan) -> list[bytes]:
    from cvserve.models.synthetic import make_scene

    return [make_scene(seed, w, h).jpeg() for seed, (w, h) in enumerate(plan.scenes)]


# --- 2. the model alone ------------------------------------------------------------------
def model_alone(model_dir: Path, images: list[bytes], plan: Plan, fp16: bool,
                budget: Budget) -> list[Row]:
    """task.run back to back on a model thread, per batch size; items prepared once."""
    import torch

    from cvserve.app.queue import Job
    from cvserve.app.settings import Settings
    from cvserve.worker.repository import load_config
    from cvserve.worker.server import build_task

    label = "fp16" if fp16 else "fp32"
    cfg = load_config(model_dir)
    settings = Settings(device=plan.device)
    if fp16:  # set whether or not this checkout's schemas have the fields yet
        cfg = cfg.model_copy(update={"allow_fp16": True})
        settings = settings.model_copy(update={"fp16": True})
    task = build_task(cfg, settings)
    if fp16 and not getattr(task.backend, "fp16", False):
        return [Row(f"alone {label}", note=f"skipped: {getattr(task.backend, 'precision', '')}")]
    if fp16 and not fp16_safe(plan.arch):
        label += " (speed only)"
    items = [task.prepare(Job(model=cfg.name, task=cfg.task, payload=data, deadline_ms=0))
             for data in images]
    keys = {task.batch_key(item) for item in items}
    rows = []
    with ThreadPoolExecutor(1, thread_name_prefix="model") as model_thread:
        for size in plan.batch_sizes:
            if budget.left() < 3 * (plan.alone_s + plan.alone_warmup_s):
                rows.append(Row(f"alone {label} b{size}", note="skipped: out of time"))
                continue
            batches = itertools.cycle([[items[(start + j) % len(items)] for j in range(size)]
                                       for start in range(len(items))])
            model_thread.submit(time_batches, task.run, batches, plan.alone_warmup_s,
                                3).result()
            times_ms = model_thread.submit(time_batches, task.run, batches,
                                           plan.alone_s, 3).result()
            rows.append(Row(f"alone {label} b{size}", size * len(times_ms) * 1000 / sum(times_ms),
                            percentile(times_ms, 50), percentile(times_ms, 99), float(size),
                            note=f"{len(times_ms)} batches, key {sorted(keys)}"))
            print(f"{rows[-1].what}: {rows[-1].images_per_s:.1f} images/s", flush=True)
    del task, items
    if plan.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def time_batches(run: Any, batches: Any, seconds: float, min_runs: int) -> list[float]:
    """Run batches back to back for `seconds` and at least min_runs times: each in ms."""
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < stop:
        batch = next(batches)
        t0 = time.perf_counter()
        run(batch)
        times.append((time.perf_counter() - t0) * 1000)
    return times


# --- 3. end to end -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`cvserve run` serving some models; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, repository: Path, models: list[str], env: dict[str, str],
                 log_path: Path, plan: Plan) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CVSERVE_")}
        self.env.update(PYTHONUNBUFFERED="1", CVSERVE_HOST="127.0.0.1",
                        CVSERVE_PORT=str(self.port), CVSERVE_MODEL_REPOSITORY=str(repository),
                        CVSERVE_MODELS=json.dumps(models), CVSERVE_DEVICE=plan.device, **env)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Service:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "cvserve.app.cli", "run"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready(180)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cvserve run exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"cvserve run not ready in {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def batch_histogram(client: httpx.AsyncClient, url: str, model: str) -> tuple[float, float]:
    """(sum, count) of the worker's batch-size histogram for one model."""
    found = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families((await client.get(f"{url}/metrics")).text):
        if family.name == BATCH_METRIC:
            for sample in family.samples:
                kind = sample.name.removeprefix(f"{BATCH_METRIC}_")
                if kind in found and sample.labels.get("model") == model:
                    found[kind] = sample.value
    return found["sum"], found["count"]


async def closed_loop(url: str, model: str, images: list[bytes], concurrency: int,
                      warmup_s: float, duration_s: float, what: str) -> Row:
    """N clients, each posting its next image when its answer arrives; what answers inside
    the window after the warm-up counts."""
    answers: list[tuple[float, float, int, dict[str, float]]] = []  # done, latency, status
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits,
                                 trust_env=False) as client:
        start = time.perf_counter() + warmup_s
        stop = start + duration_s

        async def one_client(k: int) -> None:
            for i in itertools.count(k):
                if time.perf_counter() >= stop:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/detect", content=images[i % len(images)],
                                          params={"model": model},
                                          headers={"content-type": "image/jpeg"})
                    status = r.status_code
                    timing = r.json().get("timing", {}) if status == 200 else {}
                except httpx.HTTPError:
                    status, timing = 0, {}
                t1 = time.perf_counter()
                answers.append((t1, t1 - t0, status, timing))

        clients = [asyncio.create_task(one_client(k)) for k in range(concurrency)]
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        sum0, count0 = await batch_histogram(client, url, model)
        await asyncio.sleep(max(0.0, stop - time.perf_counter()))
        sum1, count1 = await batch_histogram(client, url, model)
        await asyncio.gather(*clients)
    window = [a for a in answers if start <= a[0] <= stop]
    ok = [a for a in window if a[2] == 200]
    latencies = [a[1] * 1000 for a in ok]
    server = {part: percentile([a[3][part] for a in ok if part in a[3]], 50)
              for part in ("queue", "preprocess", "inference", "postprocess", "total")}
    return Row(what, len(ok) / duration_s, percentile(latencies, 50), percentile(latencies, 99),
               (sum1 - sum0) / (count1 - count0) if count1 > count0 else None,
               len(window) - len(ok), f"{len(ok)} answers", server)


@dataclass
class Config:
    """One end-to-end configuration: a model folder and the concurrencies to measure."""

    label: str
    model: str
    levels: list[int]


def end_to_end(repository: Path, configs: list[Config], env: dict[str, str],
               images: list[bytes], plan: Plan, out: Path, budget: Budget) -> list[Row]:
    """One `cvserve run` serving every config's model; each measured in turn."""
    rows: list[Row] = []
    per_level = {1: plan.warmup_s + plan.c1_s, 16: plan.warmup_s + plan.c16_s}
    log = out / f"service-{configs[0].label.replace(' ', '-').replace(',', '')}.log"
    with Service(repository, [c.model for c in configs], env, log, plan) as svc:
        for config in configs:
            for data in images:  # each image once: fail fast, warm up every size
                r = httpx.post(f"{svc.url}/detect", content=data, params={"model": config.model},
                               headers={"content-type": "image/jpeg"}, timeout=120,
                               trust_env=False)
                if r.status_code != 200:
                    raise RuntimeError(f"{config.model}: /detect answered {r.status_code}: "
                                       f"{r.text[:300]}")
            for n in config.levels:
                what = f"e2e {config.label} c{n}"
                if budget.left() < per_level[n] + 5:
                    rows.append(Row(what, note="skipped: out of time"))
                    continue
                warmup = plan.warmup_s + (1.0 if n > 1 else 0.0)  # new batch sizes to warm
                duration = plan.c1_s if n == 1 else plan.c16_s
                rows.append(asyncio.run(closed_loop(svc.url, config.model, images, n, warmup,
                                                    duration, what)))
                print(f"{what}: {rows[-1].images_per_s:.1f} images/s, p50 "
                      f"{rows[-1].p50_ms:.1f} ms, mean batch {rows[-1].mean_batch}", flush=True)
    return rows


# --- 4. the report -----------------------------------------------------------------------
def versions() -> dict[str, Any]:
    import PIL
    import torch
    import torchvision

    from cvserve.app.settings import Settings
    from cvserve.worker.repository import BatchingSpec, ModelConfig

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": np.__version__,
        "pillow": PIL.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "decode threads": Settings().decode_threads or Settings().cores,
        # fp32 rows run cuDNN convolutions in TF32 where this is on (PyTorch's default).
        "cudnn allow_tf32": torch.backends.cudnn.allow_tf32,
        # Which of the proposed hooks this checkout has (see worker/gpu.py's callers).
        "settings.fp16": "fp16" in Settings.model_fields,
        "settings.gpu_jpeg_decode": "gpu_jpeg_decode" in Settings.model_fields,
        "model.toml allow_fp16": "allow_fp16" in ModelConfig.model_fields,
        "model.toml instances": "instances" in BatchingSpec.model_fields,
    }
    from cvserve.worker import detection
    info["detection stages on the GPU"] = hasattr(detection.DetectionTask, "_prepare_on_device")
    return info


def key_numbers(rows: list[Row]) -> dict[str, dict[str, Any]]:
    by = {r.what: r for r in rows}
    out: dict[str, dict[str, Any]] = {}
    batched, unbatched = by.get("e2e batched c16"), by.get("e2e unbatched c16")
    if batched and unbatched and unbatched.images_per_s > 0:
        value = batched.images_per_s / unbatched.images_per_s
        out["batching_gain_c16"] = {"value": value, "of": "batched c16 / unbatched c16",
                                    "target": f">= {GAIN_TARGET:g}", "met": value >= GAIN_TARGET}
    alone = [r for r in rows if r.what.startswith("alone fp32") and r.images_per_s > 0]
    if batched and alone:
        best = max(alone, key=lambda r: r.images_per_s)
        value = batched.images_per_s / best.images_per_s
        out["e2e_over_model_alone"] = {"value": value, "of": f"batched c16 / {best.what}",
                                       "target": f">= {E2E_TARGET:g}", "met": value >= E2E_TARGET}
    alone16 = [r for r in rows if r.what.startswith("alone fp16") and r.images_per_s > 0]
    fp16 = by.get("e2e batched fp16 c16")
    if fp16 and alone16:
        best = max(alone16, key=lambda r: r.images_per_s)
        value = fp16.images_per_s / best.images_per_s
        out["e2e_over_model_alone_fp16"] = {"value": value, "of": f"fp16 c16 / {best.what}",
                                            "target": f">= {E2E_TARGET:g}",
                                            "met": value >= E2E_TARGET}
    if (c1 := by.get("e2e batched c1")) is not None:
        b1 = by.get("alone fp32 b1")
        extra = f"; model alone b1 p50 {b1.p50_ms:.1f} ms" if b1 else ""
        out["p50_ms_c1"] = {"value": c1.p50_ms, "of": f"batched c1{extra}", "target": "report",
                            "met": True}
    return out


def table(rows: list[Row]) -> str:
    lines = [f"{'what':<34} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} "
             f"{'errors':>6}  note"]
    for r in rows:
        batch = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        lines.append(f"{r.what:<34} {r.images_per_s:>9.1f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} "
                     f"{batch:>6} {r.errors:>6}  {r.note}")
    return "\n".join(lines)


def breakdown(rows: list[Row]) -> str:
    parts = ("queue", "preprocess", "inference", "postprocess", "total")
    lines = [f"{'server p50 ms':<34} " + " ".join(f"{p:>11}" for p in parts)]
    lines += [f"{r.what:<34} " + " ".join(f"{r.server_p50_ms.get(p, float('nan')):>11.1f}"
                                          for p in parts)
              for r in rows if r.server_p50_ms]
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="device cpu, the demo detector, tiny durations: checks the logic")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="seconds for everything; optional configurations are skipped when "
                        "short (default 330)")
    p.add_argument("--arch", default=ARCH,
                   help=f"the torchvision detector to export (default {ARCH}); "
                        "fasterrcnn_mobilenet_v3_large_320_fpn is one whose per-image "
                        "overheads dominate on a GPU")
    p.add_argument("--quick", action="store_true",
                   help="fp32 batched and unbatched only: no fp16, no second instance, "
                        "no Pillow-decode run")
    p.add_argument("--tests", type=Path, default=None,
                   help="a file holding the test run's summary line, for the table")
    return p.parse_args(argv)


def run_stage(name: str, errors: dict[str, str], fn: Any, *args: Any) -> Any:
    """Run one stage; a failure is recorded and the others still run."""
    t0 = time.monotonic()
    print(f"--- {name}", flush=True)
    try:
        return fn(*args)
    except Exception as exc:
        traceback.print_exc()
        errors[name] = f"{type(exc).__name__}: {str(exc)[:400]}"
        return None
    finally:
        print(f"--- {name}: {time.monotonic() - t0:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `timeout` (bench/gpu_check.sh) sends SIGTERM: exit through the `with` blocks, so that
    # the service this process started is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    plan = make_plan(args.cpu_dry_run, args.arch)
    info = versions()
    print(json.dumps(info, indent=1), flush=True)
    if plan.device == "cuda" and not info["gpu"]:
        print("no CUDA device visible to torch: use --cpu-dry-run on a CPU", file=sys.stderr)
        return 2
    errors: dict[str, str] = {}
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="cvserve-gpu-check-"))
    try:
        repository = workdir / "models"
        base = run_stage("export", errors, export, plan, repository)
        if base is None:
            return finish(args, plan, info, rows, errors)
        images = scenes(plan)
        for fp16 in (False,) if args.quick else (False, True):
            found = run_stage(f"model alone {'fp16' if fp16 else 'fp32'}", errors, model_alone,
                              base, images, plan, fp16, budget)
            rows += found or []
        configs = [Config("batched", variant(base, "det-b16", plan.max_batch), [1, 16]),
                   Config("unbatched", variant(base, "det-b1", 1), [16])]
        if (info["settings.fp16"] and info["model.toml allow_fp16"] and plan.device == "cuda"
                and not args.quick):
            # Speed only where the architecture is not fp16-safe (see model_alone).
            configs.append(Config("batched fp16", variant(base, "det-b16-fp16", plan.max_batch,
                                                          allow_fp16=True), [1, 16]))
        if info["model.toml instances"] and not args.quick:  # two model threads, two streams
            configs.append(Config("batched 2 instances", variant(
                base, "det-b16-x2", plan.max_batch, instances=2), [16]))
        env = {"CVSERVE_FP16": "true", "CVSERVE_GPU_JPEG_DECODE": "true"}
        rows += run_stage("end to end", errors, end_to_end, repository, configs, env, images,
                          plan, args.out, budget) or []
        if not fp16_safe(plan.arch):
            for row in rows:
                if row.what.startswith("e2e batched fp16"):
                    row.note += "; speed only: the architecture is not fp16-safe"
        if args.quick:
            pass
        elif budget.left() > plan.warmup_s + plan.c16_s + 40:
            pillow = [Config("batched, Pillow decode", "det-b16", [16])]
            rows += run_stage("end to end, Pillow decode", errors, end_to_end, repository,
                              pillow, {"CVSERVE_GPU_JPEG_DECODE": "false"}, images, plan,
                              args.out, budget) or []
        else:
            rows.append(Row("e2e batched, Pillow decode c16", note="skipped: out of time"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return finish(args, plan, info, rows, errors)


def finish(args: argparse.Namespace, plan: Plan, info: dict[str, Any], rows: list[Row],
           errors: dict[str, str]) -> int:
    numbers = key_numbers(rows)
    tests = args.tests.read_text().strip() if args.tests and args.tests.exists() else "not run"
    report = {"plan": asdict(plan), "versions": info, "tests": tests,
              "rows": [asdict(r) for r in rows], "key_numbers": numbers, "errors": errors}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{breakdown(rows)}")
    print(f"\n=== cvserve GPU check: {plan.arch} ({plan.weights} weights) on "
          f"{info['gpu'] or 'cpu (dry run)'}; torch {info['torch']}, torchvision "
          f"{info['torchvision']}, {info['cpus']} cpus")
    print(f"tests/test_gpu_path.py: {tests}")
    print(table(rows))
    for name, n in numbers.items():
        verdict = "" if n["target"] == "report" else (
            f"  target {n['target']}: {'met' if n['met'] else 'NOT met'}")
        print(f"{name}: {n['value']:.3f}  ({n['of']}){verdict}")
    for stage, message in errors.items():
        print(f"FAILED {stage}: {message}")
    print(f"(JSON: {args.out / 'gpu_check.json'})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

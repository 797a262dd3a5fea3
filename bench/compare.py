"""Compare serving stacks on one model, side by side in one run (../shared/PERF.md).

One invocation, one model, each stack alone on the machine (never two at once):

1. backend alone: the model in this process, images preprocessed once, `task.run` back to
   back at batch 1, 2, 4 ... max_batch_size (detect_bench.benchmark_raw);
2. plain server: bench/plain_server.py, FastAPI + uvicorn, one model call per request;
3. cvserve embedded: `cvserve run`;
4. cvserve redis: `cvserve api` + `cvserve worker` over --redis-url (keys deleted after);
5. cvserve unbatched (--unbatched-too): `cvserve run` on a copy of the model with
   max_batch_size = 1;
6. Triton (PyTriton, dynamic batching): reported as skipped (not implemented here).

Every answer is checked against the detections the task itself gives for that image,
computed in this process before any server starts; a mismatch counts as an error.

    python bench/compare.py --yolox ../shared/models --duration 3 --warmup 1 --concurrency 1,4
    python bench/compare.py --frcnn --unbatched-too --out frcnn.json
    python bench/compare.py --model-repository models --model demo-detector

bench/README.md says what each column and ratio means.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from detect_bench import (
    LOOPBACK,
    Check,
    Row,
    Service,
    ServiceSpec,
    benchmark_raw,
    delete_redis_keys,
    export_random_model,
    folder_images,
    format_breakdown,
    format_errors,
    format_table,
    generated_images,
    measure_level,
    service_spec,
    smoke_test,
)

PLAIN_SERVER = Path(__file__).resolve().parent / "plain_server.py"
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


def measure_stack(stack: Stack, server: Service, model: str, images: list[bytes],
                  check: Check, args: argparse.Namespace) -> Stack:
    """Start the server, send each image once, then each concurrency level; a server that
    fails to start or answer is reported as failed, and the next stack runs."""
    server.log_dir.mkdir(parents=True)
    try:
        with server:
            asyncio.run(smoke_test(server.spec, model, images))
            if server.spec.metrics_url is not None:  # cvserve: what its warm-up chose
                stack.policy = httpx.get(f"{server.spec.url}/models/{model}",
                                         timeout=10).json().get("batching_policy", {})
            for n in args.concurrency:
                print(f"{stack.name} c{n}: {args.warmup:g} s warm-up + {args.duration:g} s ...",
                      file=sys.stderr)
                stack.rows.append(asyncio.run(measure_level(
                    server.spec, model, images, n, args.warmup, args.duration, check)))
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
    """Each stack in turn, alone on the machine: backend, plain, cvserve's modes, Triton."""
    def serve(stack: Stack, server: Service) -> Stack:
        return measure_stack(stack, server, name, images, check, args)

    def cvserve(repo: Path, redis_url: str | None = None) -> ServiceSpec:
        return service_spec(repo, name, args.device, redis_url)

    stacks = [Stack("backend alone", benchmark_raw(repository / name, images, args.device,
                                                   args.warmup, args.duration))]
    plain_spec = cvserve(repository)
    plain_spec.commands, plain_spec.metrics_url = ["plain"], None
    plain = serve(Stack("plain server"),
                  PlainServer(plain_spec, workdir / "plain", repository, name))
    for row in plain.rows:
        row.mean_batch = 1.0  # one model call per request, by construction
    stacks += [plain, serve(Stack("cvserve embedded"),
                            Service(cvserve(repository), workdir / "embedded"))]

    redis_stack = Stack("cvserve redis", note=redis_note(args.redis_url) or "")
    if not redis_stack.note:
        spec = cvserve(repository, args.redis_url)
        try:
            serve(redis_stack, Service(spec, workdir / "redis"))
        finally:
            if spec.key_prefix:  # never an empty prefix: that would match every key
                delete_redis_keys(args.redis_url, spec.key_prefix)
    stacks.append(redis_stack)

    if args.unbatched_too:
        unbatched = Stack("cvserve unbatched")
        if max_batch > 1:
            copy = unbatched_copy(repository, name, workdir)
            serve(unbatched, Service(cvserve(copy), workdir / "unbatched-logs"))
        else:
            unbatched.note = "skipped: the model's max_batch_size is already 1"
        stacks.append(unbatched)

    triton = "pytriton installed, but this stack is not implemented in compare.py yet"
    if importlib.util.find_spec("pytriton") is None:
        triton = "pytriton not installed"
    return [*stacks, Stack("triton (pytriton)", note=f"skipped: {triton}")]


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
    p.add_argument("--out", type=Path, default=None, help="also write everything as JSON")
    args = p.parse_args(argv)
    if (args.model_repository is None) != (args.model is None):
        p.error("--model-repository and --model NAME go together")
    try:
        args.concurrency = [int(n) for n in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency takes numbers like 1,4,16, got '{args.concurrency}'")
    if min(args.concurrency) < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--concurrency must be >= 1, --duration > 0 and --warmup >= 0")
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
    found = ratios(stacks, args.concurrency, cfg.input.resize == "rcnn")
    report(args, name, stacks, found, expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark POST /segment: semantic segmenters and Mask R-CNN, the service next to the raw
backend, in one table.

1. semantic models (random weights, ONNX by default) on generated photos of each --sizes:
   the raw backend (an onnxruntime session, or the TorchScript module, on the input that
   worker/preprocess.py makes of the photo) and `cvserve run` (POST /segment?model=NAME,
   one request at a time), alternating one raw run and one request so that the machine's
   drift hits both alike. Median ms per image, and the median of each answer's `timing`.
2. Mask R-CNN (random weights, TorchScript, score floor 0) on a 1024x1024 photo asked for
   20 instances (`max_detections=20&score_threshold=0`): the same two columns (raw: the
   scripted core on the resized, padded input worker/detection.py makes), then the mask
   encoding alone (`paste_masks` + `encode_rle` of those 20 masks, in this process) as a
   share of the service request, against the issue's budget of 10 %.

    python bench/segment_bench.py                              # the defaults, ~6 minutes
    python bench/segment_bench.py --runs 5 --mask-runs 2       # a quick look
    python bench/segment_bench.py --repository /tmp/segrepo --out seg.json  # exports kept

bench/README.md says what each column means.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from detect_bench import REQUEST_TIMEOUT_S, Service, service_spec

from cvserve.app.settings import Settings
from cvserve.worker.repository import ModelConfig, load_config

SEMANTIC = "lraspp_mobilenet_v3_large,deeplabv3_mobilenet_v3_large"
# A real model's label map has thin class boundaries, a random one's is noise everywhere:
# the mirror's pretrained DeepLab (../shared/models) shows the postprocess users get.
MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "models"
REAL_SEMANTIC = "deeplabv3-mobilenetv2-voc"
MASK_RCNN = "maskrcnn_resnet50_fpn"
MASK_PHOTO = 1024  # px, square: the "1024x1024 image"
INSTANCES = 20  # the "20 instances"
ENCODING_BUDGET = 0.10  # share of the request that pasting and encoding masks may take
WARMUP_RUNS = 2  # per side: TorchScript profiles, then optimizes, over its first runs
READY_TIMEOUT_S = 600.0  # Mask R-CNN's warm-up alone takes a minute or more on 2 cores
TIMING_PARTS = ("preprocess", "inference", "postprocess")


@dataclass
class Row:
    """One model at one photo size."""

    model: str
    backend: str  # onnx | torchscript
    photo: str  # the JPEG sent, "WxH"
    model_input: str  # what the model ran on, "WxH" (after resize and padding)
    raw_ms: float  # median per image
    service_ms: float  # median per request, as the client saw it
    server_ms: dict[str, float] = field(default_factory=dict)  # median of each `timing` part


class SlowService(Service):
    """detect_bench's Service, waiting longer for /readyz."""

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        super().wait_ready(timeout_s)


# --- models --------------------------------------------------------------------------
def ensure_models(repository: Path, semantic: list[str], mask_rcnn: str | None, fmt: str,
                  min_size: int, mirror: Path | None) -> None:
    """Install catalog models from the mirror and export (random weights) every other
    model not already in the repository."""
    from cvserve.models.catalog import CATALOG, install
    from cvserve.models.export import export_detector
    from cvserve.models.segment_export import export_segmenter

    for arch in semantic:
        if arch in CATALOG and not (repository / arch / "model.toml").is_file():
            if mirror is None:
                raise SystemExit(f"{arch} comes from the catalog: pass --mirror DIR")
            install(arch, repository, mirror, download=False)
        elif not (repository / arch / "model.toml").is_file():
            print(f"exporting {arch} ({fmt}, random weights) ...", file=sys.stderr)
            export_segmenter(arch, repository, weights="random", fmt=fmt, check=False)
    if mask_rcnn and not (repository / mask_rcnn / "model.toml").is_file():
        print(f"exporting {mask_rcnn} (torchscript, random weights, score floor 0, min_size "
              f"{min_size}) ...", file=sys.stderr)
        export_detector(mask_rcnn, repository, weights="random", fmt="torchscript",
                        score_floor=0.0, min_size=min_size, check=False)


def raw_runner(cfg: ModelConfig, settings: Settings,
               inputs: dict[str, np.ndarray]) -> Callable[[], dict[str, np.ndarray]]:
    """One call of the bare model on fixed inputs: an onnxruntime session with the worker's
    thread settings (worker/onnx_backend.py), or the TorchScript module."""
    if cfg.backend == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.intra_op_threads or settings.cores
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      "1" if settings.onnx_spinning else "0")
        session = ort.InferenceSession(str(cfg.artifact(1)), opts,
                                       providers=["CPUExecutionProvider"])
        return lambda: dict(zip(cfg.outputs, session.run(cfg.outputs, inputs), strict=True))
    with warnings.catch_warnings():  # deprecated upstream, still what the worker loads
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(cfg.artifact()), map_location="cpu").eval()
    tensors = [torch.from_numpy(inputs[name]) for name in cfg.inputs]

    def run() -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = module(*tensors)
        out = (out,) if isinstance(out, torch.Tensor) else out
        return {name: t.numpy() for name, t in zip(cfg.outputs, out, strict=True)}
    return run


def semantic_input(cfg: ModelConfig, data: bytes) -> dict[str, np.ndarray]:
    """The photo as the worker preprocesses it. # {input: [1, 3, h, w] float32}"""
    from cvserve.worker.imaging import decode_rgb
    from cvserve.worker.preprocess import preprocess

    image, _ = decode_rgb(data, 10**9)
    x, _ = preprocess(image, cfg.input)
    return {cfg.inputs[0]: x[None]}


def mask_rcnn_input(cfg: ModelConfig, settings: Settings,
                    data: bytes) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """The photo resized, normalized and padded as worker/detection.py batches it.
    # -> ({images [1, 3, H, W] float32, image_sizes [1, 2] int64}, resized (h, w))"""
    from cvserve.app.queue import Job
    from cvserve.worker.server import build_task

    task = build_task(cfg, settings)
    item = task.prepare(Job(model=cfg.name, task=cfg.task, payload=data, deadline_ms=0))
    resized = item.meta["resized_size"]
    images = task.transform.batch_images([item.inputs], cfg.input.size_divisible)
    return ({"images": images.numpy(), "image_sizes": np.array([resized], dtype=np.int64)},
            resized)


# --- measuring -----------------------------------------------------------------------
def timed_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def post_segment(client: httpx.Client, model: str, data: bytes,
                 params: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/segment", content=data, headers={"content-type": "image/jpeg"},
                    params={"model": model, "timeout_s": REQUEST_TIMEOUT_S, **params})
    if r.status_code != 200:
        raise SystemExit(f"/segment?model={model} answered {r.status_code}: {r.text[:500]}")
    return r.json()


def alternate(raw: Callable[[], Any], request: Callable[[], dict[str, Any]], runs: int,
              model_thread: ThreadPoolExecutor) -> tuple[float, float, dict[str, float], Any]:
    """WARMUP_RUNS + runs pairs of one raw run (on the model thread, as the worker runs its
    model) and one request. -> (raw median ms, service median ms, median of each timing
    part, the last raw outputs)"""
    raw_ms, service_ms, timings = [], [], []
    out = None
    for i in range(WARMUP_RUNS + runs):
        ms, out = model_thread.submit(timed_ms, raw).result()
        answer_ms, answer = timed_ms(request)
        if i >= WARMUP_RUNS:
            raw_ms.append(ms)
            service_ms.append(answer_ms)
            timings.append(answer["timing"])
    parts = {p: statistics.median(t[p] for t in timings) for p in TIMING_PARTS}
    return statistics.median(raw_ms), statistics.median(service_ms), parts, out


def measure_semantic(client: httpx.Client, repository: Path, names: list[str],
                     sizes: list[int], runs: int, settings: Settings,
                     model_thread: ThreadPoolExecutor) -> list[Row]:
    from cvserve.models.synthetic import make_scene

    rows = []
    for name in names:
        cfg = load_config(repository / name)
        for size in sizes:
            print(f"{name} at {size}x{size}: {runs} runs ...", file=sys.stderr)
            data = make_scene(size, size, size).jpeg()
            inputs = semantic_input(cfg, data)
            raw = raw_runner(cfg, settings, inputs)
            raw_ms, service_ms, parts, _ = alternate(
                raw, functools.partial(post_segment, client, name, data, {}), runs, model_thread)
            shape = inputs[cfg.inputs[0]].shape  # [1, 3, h, w] or NHWC [1, h, w, 3]
            h, w = shape[1:3] if cfg.input.layout == "NHWC" else shape[-2:]
            rows.append(Row(name, cfg.backend, f"{size}x{size}", f"{w}x{h}", raw_ms,
                            service_ms, parts))
    return rows


def measure_mask_rcnn(client: httpx.Client, repository: Path, name: str, runs: int,
                      encode_runs: int, settings: Settings,
                      model_thread: ThreadPoolExecutor) -> tuple[Row, dict[str, Any]]:
    """The Mask R-CNN row, and what pasting and encoding its 20 masks costs."""
    from cvserve.models.synthetic import make_scene

    cfg = load_config(repository / name)
    data = make_scene(MASK_PHOTO, MASK_PHOTO, MASK_PHOTO).jpeg()
    inputs, resized = mask_rcnn_input(cfg, settings, data)
    raw = raw_runner(cfg, settings, inputs)
    params = {"max_detections": INSTANCES, "score_threshold": 0}

    def request() -> dict[str, Any]:
        answer = post_segment(client, name, data, params)
        found = [d for d in answer["detections"] if "mask" in d]
        if len(found) != INSTANCES:
            raise SystemExit(f"{name}: expected {INSTANCES} detections with masks, got "
                             f"{len(found)}; export it with score_floor=0.0")
        return answer

    print(f"{name} at {MASK_PHOTO}x{MASK_PHOTO}: {runs} runs ...", file=sys.stderr)
    raw_ms, service_ms, parts, out = alternate(raw, request, runs, model_thread)
    h, w = inputs["images"].shape[-2:]
    row = Row(name, cfg.backend, f"{MASK_PHOTO}x{MASK_PHOTO}", f"{w}x{h}", raw_ms,
              service_ms, parts)
    encoding = time_mask_encoding(out, resized, encode_runs)
    encoding["share"] = encoding["total_ms"] / service_ms
    encoding["passed"] = encoding["share"] < ENCODING_BUDGET
    return row, encoding


def time_mask_encoding(out: dict[str, np.ndarray], resized_hw: tuple[int, int],
                       runs: int) -> dict[str, Any]:
    """`finish`'s mask work for the top INSTANCES detections: paste each mask into the
    MASK_PHOTO-square photo, then COCO-RLE it. # out: the core's outputs, batch of 1"""
    from torchvision.models.detection.transform import resize_boxes

    from cvserve.worker.masks import encode_rle, paste_masks

    hw = (MASK_PHOTO, MASK_PHOTO)
    boxes = resize_boxes(torch.from_numpy(out["boxes"][0, :INSTANCES]), list(resized_hw),
                         list(hw))  # [20, 4] xyxy, photo px
    masks = out["masks"][0, :INSTANCES]  # [20, 28, 28] probabilities over each box
    paste_ms, encode_ms, total_ms = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        pasted = list(paste_masks(masks, boxes, hw))  # 20 x [1024, 1024] bool
        t1 = time.perf_counter()
        for mask in pasted:
            encode_rle(mask)
        t2 = time.perf_counter()
        paste_ms.append((t1 - t0) * 1000)
        encode_ms.append((t2 - t1) * 1000)
        total_ms.append((t2 - t0) * 1000)
    return {"instances": len(pasted), "photo": f"{MASK_PHOTO}x{MASK_PHOTO}",
            "mean_mask_px": float(np.mean([m.sum() for m in pasted])),
            "paste_ms": statistics.median(paste_ms), "encode_ms": statistics.median(encode_ms),
            "total_ms": statistics.median(total_ms)}


# --- the service ---------------------------------------------------------------------
def serve_and_measure(repository: Path, names: list[str], log_dir: Path,
                      measure: Callable[[httpx.Client], Any]) -> tuple[Any, dict[str, Any]]:
    """`cvserve run` serving `names` (embedded, CPU, no default model built) around
    `measure(client)`. -> (what measure returned, each model's batching policy)"""
    spec = service_spec(repository, names[0], "cpu", None)
    spec.env.update(CVSERVE_MODELS=json.dumps(names), CVSERVE_AUTO_BUILD_DEFAULT="false")
    log_dir.mkdir(parents=True)
    print(f"starting cvserve run ({', '.join(names)}; warm-up included) ...", file=sys.stderr)
    with SlowService(spec, log_dir), httpx.Client(base_url=spec.url, trust_env=False,
                                                   timeout=REQUEST_TIMEOUT_S) as client:
        policies = {n: client.get(f"/models/{n}").json().get("batching_policy") for n in names}
        return measure(client), policies


# --- the report ----------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    lines = ["| model | photo | model input | raw ms | service ms | service/raw | "
             "preprocess ms | inference ms | postprocess ms |", "|---|---|---|" + "---:|" * 6]
    for r in rows:
        parts = " | ".join(f"{r.server_ms[p]:.1f}" for p in TIMING_PARTS)
        lines.append(f"| {r.model} ({r.backend}) | {r.photo} | {r.model_input} | "
                     f"{r.raw_ms:.1f} | {r.service_ms:.1f} | {r.service_ms / r.raw_ms:.2f} | "
                     f"{parts} |")
    return "\n".join(lines)


def format_encoding(e: dict[str, Any], row: Row) -> str:
    verdict = "pass" if e["passed"] else "FAIL"
    return (f"mask encoding, {e['instances']} instances at {e['photo']} (paste_masks + "
            f"encode_rle, in-process): {e['total_ms']:.1f} ms (paste {e['paste_ms']:.1f} + "
            f"encode {e['encode_ms']:.1f}; {e['mean_mask_px']:.0f} px per mask on "
            f"average) = {e['share']:.1%} of the service request ({row.service_ms:.0f} ms); "
            f"budget {ENCODING_BUDGET:.0%}: {verdict}. Service postprocess (median): "
            f"{row.server_ms['postprocess']:.1f} ms.")


# --- command line --------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--semantic", default=None,
                   help=f"comma-separated segmenters (default {SEMANTIC}, plus "
                        f"{REAL_SEMANTIC} when the mirror has it; also fcn_resnet50, "
                        "deeplabv3_resnet50); '' skips them")
    p.add_argument("--mirror", type=Path, default=MIRROR if MIRROR.is_dir() else None,
                   help="folder of the catalog's real models (default ../shared/models)")
    p.add_argument("--maskrcnn", default=MASK_RCNN,
                   help=f"the Mask R-CNN architecture / model folder (default {MASK_RCNN}); "
                        "'' skips it")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"),
                   help="the semantic models' export format (default onnx)")
    p.add_argument("--sizes", default="512,1024",
                   help="square photo sizes for the semantic models, px (default 512,1024)")
    p.add_argument("--min-size", type=int, default=800,
                   help="Mask R-CNN's resize target, shorter side px (default 800)")
    p.add_argument("--runs", type=int, default=20,
                   help="measured raw/service pairs per semantic model and size, and mask "
                        "encoding runs (default 20)")
    p.add_argument("--mask-runs", type=int, default=5,
                   help="measured raw/service pairs for Mask R-CNN (default 5)")
    p.add_argument("--repository", type=Path, default=None,
                   help="a model repository: models already there are used as they are, "
                        "missing ones exported into it (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    if args.semantic is None:
        real = args.mirror is not None and (args.mirror / REAL_SEMANTIC).is_dir()
        args.semantic = SEMANTIC + (f",{REAL_SEMANTIC}" if real else "")
    args.semantic = [s.strip() for s in args.semantic.split(",") if s.strip()]
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes takes numbers like 512,1024, got '{args.sizes}'")
    if args.runs < 1 or args.mask_runs < 1 or min(args.sizes) < 1:
        p.error("--runs, --mask-runs and --sizes must be >= 1")
    if not args.semantic and not args.maskrcnn:
        p.error("nothing to measure: --semantic and --maskrcnn are both empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(device="cpu")
    with tempfile.TemporaryDirectory(prefix="cvserve-segbench-") as tmp:
        repository = args.repository or Path(tmp) / "models"
        ensure_models(repository, args.semantic, args.maskrcnn, args.format, args.min_size,
                      args.mirror)
        rows: list[Row] = []
        encoding: dict[str, Any] | None = None
        policies: dict[str, Any] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="raw-model") as model_thread:
            if args.semantic:
                found, policy = serve_and_measure(
                    repository, args.semantic, Path(tmp) / "semantic-logs",
                    lambda c: measure_semantic(c, repository, args.semantic, args.sizes,
                                               args.runs, settings, model_thread))
                rows += found
                policies.update(policy)
            if args.maskrcnn:
                (row, encoding), policy = serve_and_measure(
                    repository, [args.maskrcnn], Path(tmp) / "maskrcnn-logs",
                    lambda c: measure_mask_rcnn(c, repository, args.maskrcnn, args.mask_runs,
                                                args.runs, settings, model_thread))
                rows.append(row)
                policies.update(policy)
    mask_runs = f" ({args.mask_runs} for Mask R-CNN)" if args.maskrcnn else ""
    print(f"\nPOST /segment, one request at a time, CPU, {os.cpu_count()} cores; medians of "
          f"{args.runs} runs{mask_runs} after {WARMUP_RUNS} warm-up runs, raw and service "
          "alternating\n")
    print(format_table(rows))
    if encoding is not None:
        print(f"\n{format_encoding(encoding, rows[-1])}")
    for name, p in policies.items():
        if p:
            print(f"{name}: service policy {p.get('instances')} instance(s), batches up to "
                  f"{p.get('max_batch_size')} ({p.get('source')})")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "device": "cpu",
            "runs": args.runs, "mask_runs": args.mask_runs, "warmup_runs": WARMUP_RUNS,
            "rows": [asdict(r) for r in rows], "mask_encoding": encoding,
            "policies": policies}, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`cvserve predict`: send files and folders to a service, concurrently, with progress.

Each input gets one result in --out (its JSON, or the PNG rendering), or for detection one
COCO results file over them all. A file that fails is reported with the api's message and
does not stop the others; the exit status says whether any failed. Without --url the
embedded service is started for the run and stopped after it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from cvserve.client import Client, CvserveHTTPError

TASKS = ("auto", "detect", "segment", "classify-video", "explain")
# PNG renderings exist for these (a video's answer is JSON only).
RENDERED = ("detect", "segment", "explain")


def kind(path: Path) -> str:
    """'image', 'video' or 'unknown', from the first bytes (not the name): a folder of
    downloads has wrong extensions. The service checks again and has the last word."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")) or (
            head[:4] == b"RIFF" and head[8:12] == b"WEBP") or head[:4] in (b"II*\0", b"MM\0*"):
        return "image"
    if head[4:8] == b"ftyp" or head.startswith(b"\x1a\x45\xdf\xa3") or (
            head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "video"
    return "unknown"


def inputs(paths: list[str]) -> list[Path]:
    """Files named, and the files under folders named (recursively, hidden ones skipped),
    in a stable order."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"cvserve predict: {name}: no such file or folder")
    return found


@dataclass
class Outcome:
    path: Path
    task: str
    result: dict[str, Any] | None = None
    png: bytes | None = None
    error: str | None = None


def run_one(client: Client, path: Path, task: str, fmt: str, model: str | None,
            options: dict[str, Any]) -> Outcome:
    if task == "auto":
        task = "classify-video" if kind(path) == "video" else "detect"
    try:
        if fmt == "png" and task in RENDERED:
            return Outcome(path, task, png=client.render(task, path, model, **options))
        if task == "detect":
            answer: Any = client.detect(path, model, **options)
        elif task == "segment":
            answer = client.segment(path, model, **options)
        elif task == "explain":
            answer = client.explain(path, model, **options)
        else:
            answer = client.classify_video(path, model, **options)
        return Outcome(path, task, result=answer.model_dump(mode="json", exclude_none=True))
    except CvserveHTTPError as exc:
        return Outcome(path, task, error=f"{exc.status} {exc.code}: {exc.message}")
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        return Outcome(path, task, error=f"{type(exc).__name__}: {exc}")


def out_name(path: Path, roots: list[Path], out: Path, suffix: str) -> Path:
    """Where a result goes: the input's path under the folder it was found in, mirrored
    under --out, with the suffix added (a.jpg -> a.jpg.json, so a.jpg and a.png differ)."""
    for root in roots:
        if root.is_dir() and path.is_relative_to(root):
            return out / root.name / f"{path.relative_to(root)}{suffix}"
    return out / f"{path.name}{suffix}"


class CocoWriter:
    """One COCO results list over every detection (pycocotools' loadRes format). Image
    ids and category ids come from a ground-truth file when one is given (matched by file
    name and category name), else images are numbered in input order and categories are
    the model's class ids; coco_images.json records the numbering."""

    def __init__(self, ground_truth: Path | None) -> None:
        self.images: dict[str, int] = {}
        self.categories: dict[str, int] | None = None
        if ground_truth is not None:
            gt = json.loads(ground_truth.read_text())
            self.images = {Path(im["file_name"]).name: im["id"] for im in gt["images"]}
            self.categories = {c["name"]: c["id"] for c in gt["categories"]}
        self.numbered: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def add(self, path: Path, answer: dict[str, Any]) -> None:
        image_id = self.images.get(path.name)
        if image_id is None:
            image_id = len(self.numbered) + 1
            self.numbered.append({"id": image_id, "file_name": str(path)})
        for det in answer.get("detections", []):
            box = det["box"]
            category = (self.categories.get(det["label"]) if self.categories is not None
                        else det["class_id"])
            if category is None:
                continue  # a class the ground truth does not have
            self.results.append({
                "image_id": image_id, "category_id": category, "score": det["score"],
                "bbox": [box["x1"], box["y1"], box["x2"] - box["x1"], box["y2"] - box["y1"]]})

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        (out / "coco_results.json").write_text(json.dumps(self.results))
        written = [out / "coco_results.json"]
        if self.numbered:
            (out / "coco_images.json").write_text(json.dumps(self.numbered, indent=1))
            written.append(out / "coco_images.json")
        return written


@dataclass
class Options:
    paths: list[str]
    task: str
    model: str | None
    url: str | None
    out: Path
    fmt: str
    concurrency: int
    api_key: str | None
    coco_gt: Path | None
    params: dict[str, Any]


def predict(opts: Options) -> int:
    files = inputs(opts.paths)
    if not files:
        print("cvserve predict: no files found", file=sys.stderr)
        return 2
    if opts.fmt == "coco" and opts.task not in ("auto", "detect"):
        print("cvserve predict: --format coco is for detection", file=sys.stderr)
        return 2
    service = None if opts.url else EmbeddedService().start()
    url = opts.url or service.url  # type: ignore[union-attr]
    try:
        with Client(url, api_key=opts.api_key, timeout=300) as client:
            try:  # one clear message for a wrong --url, not a retried failure per file
                client.http.get(f"{client.url}/healthz", timeout=10)
            except httpx.HTTPError as exc:
                print(f"cvserve predict: no service at {url} ({exc})", file=sys.stderr)
                return 2
            return _predict(client, files, opts)
    finally:
        if service is not None:
            service.stop()


def _predict(client: Client, files: list[Path], opts: Options) -> int:
    roots = [Path(p) for p in opts.paths]
    coco = CocoWriter(opts.coco_gt) if opts.fmt == "coco" else None
    failed: list[Outcome] = []
    stop = threading.Event()
    bar = tqdm(total=len(files), unit="file", desc="predict", dynamic_ncols=True,
               file=sys.stderr)
    pool = ThreadPoolExecutor(max(1, opts.concurrency))
    pending: set[Future[Outcome]] = set()
    todo = iter(files)
    try:
        # At most `concurrency` in flight: Ctrl-C then abandons only those, not a
        # queue of thousands already handed to the pool.
        while True:
            while not stop.is_set() and len(pending) < opts.concurrency:
                path = next(todo, None)
                if path is None:
                    break
                pending.add(pool.submit(run_one, client, path, opts.task, opts.fmt,
                                        opts.model, opts.params))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                outcome = future.result()
                if outcome.error is not None:
                    failed.append(outcome)
                    bar.write(f"FAILED {outcome.path}: {outcome.error}", file=sys.stderr)
                else:
                    save(outcome, roots, opts.out, coco)
                bar.update(1)
                bar.set_postfix(failed=len(failed))
    except KeyboardInterrupt:
        stop.set()
        bar.write("interrupted: keeping what is done", file=sys.stderr)
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        _summary(bar.n, len(files), failed, opts, coco)
        return 130
    pool.shutdown()
    bar.close()
    _summary(bar.n, len(files), failed, opts, coco)
    return 1 if failed else 0


def save(outcome: Outcome, roots: list[Path], out: Path, coco: CocoWriter | None) -> None:
    if coco is not None and outcome.task == "detect" and outcome.result is not None:
        coco.add(outcome.path, outcome.result)
        return
    if outcome.png is not None:
        target, data = out_name(outcome.path, roots, out, ".png"), outcome.png
    else:
        target = out_name(outcome.path, roots, out, ".json")
        data = json.dumps(outcome.result, indent=1).encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _summary(done: int, total: int, failed: list[Outcome], opts: Options,
             coco: CocoWriter | None) -> None:
    written = coco.write(opts.out) if coco is not None else []
    print(f"{done - len(failed)} of {total} files done, {len(failed)} failed; results in "
          f"{opts.out}" + "".join(f"\n  {p}" for p in written), file=sys.stderr)
    for outcome in failed:
        print(f"  failed: {outcome.path}: {outcome.error}", file=sys.stderr)


class EmbeddedService:
    """`cvserve run` on a free local port for the length of one predict run."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="cvserve-predict-", suffix=".log",
                                               delete=False)

    def start(self, timeout: float = 600) -> EmbeddedService:
        env = {**os.environ, "CVSERVE_HOST": "127.0.0.1", "CVSERVE_PORT": str(self.port)}
        print(f"starting the embedded service (log: {self.log.name}) ...", file=sys.stderr)
        self.proc = subprocess.Popen([sys.executable, "-m", "cvserve.app.cli", "run"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # Ctrl-C is ours to handle
        deadline = time.monotonic() + timeout
        with Client(self.url) as client:
            while not client.ready():
                if self.proc.poll() is not None:
                    raise SystemExit(f"cvserve predict: the embedded service exited; see "
                                     f"{self.log.name}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"cvserve predict: the embedded service was not ready in "
                                     f"{timeout:.0f} s; see {self.log.name}")
                time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        logging.getLogger("cvserve").debug("embedded service stopped")

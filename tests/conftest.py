"""Shared fixtures: model repositories built offline, real cvserve processes, Redis prefixes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from cvserve.models.export import DEFAULT_DETECTOR, export_detector

REPO_ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("CVSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Real pretrained models (models/) and photos (testdata/), laid out as ../shared beside
# the checkout; tests that need them skip, saying so, where it is absent.
SHARED = Path(os.environ.get("CVSERVE_TEST_SHARED", REPO_ROOT.parent / "shared"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def random_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with torchvision's default detector, random weights, as TorchScript."""
    repo = tmp_path_factory.mktemp("repo-random")
    export_detector(DEFAULT_DETECTOR, repo, weights="random", fmt="torchscript",
                    name="frcnn-ts", check=False)
    pin_batching(repo / "frcnn-ts")  # these tests need no measured policy; start faster
    return repo


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL} ({exc}); start redis-server or set "
                    "CVSERVE_TEST_REDIS_URL")
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own, deleted afterwards."""
    prefix = f"cvserve-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        r.delete(*keys)


class Service:
    """One `cvserve` process (run, api or worker) with its own environment and log file."""

    def __init__(self, command: str, env: dict[str, str], log_dir: Path,
                 port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.command = command
        self.port = port
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        if port is not None:
            self.env["CVSERVE_PORT"] = str(port)
        self.log_path = log_dir / f"{command}-{uuid.uuid4().hex[:6]}.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cvserve.app.cli", self.command, *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        return self

    def wait_ready(self, timeout: float = 90) -> Service:
        """Until /readyz answers 200 (api processes) — a worker must be serving a model."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.command} not ready in {timeout} s:\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 90) -> Service:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return self
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited:\n{self.log()}")
            time.sleep(0.2)
        raise TimeoutError(f"'{text}' not in the {self.command} log in {timeout} s:\n"
                           f"{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


@contextmanager
def embedded_service(env: dict[str, str], log_dir: Path) -> Iterator[Service]:
    """`cvserve run` on a free port, ready, stopped afterwards."""
    svc = Service("run", env, log_dir, port=free_port()).start()
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    """Start services with `services.append(Service(...).start())`; all stop at the end."""
    started: list[Service] = []
    yield started
    for svc in reversed(started):
        svc.stop()


DEMO_CHECKPOINT = REPO_ROOT / "models" / "demo" / "detector.pt"


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The demo detector's trained weights (committed; `cvserve models train-demo`)."""
    assert DEMO_CHECKPOINT.is_file(), f"{DEMO_CHECKPOINT} is part of the repository"
    return DEMO_CHECKPOINT


@pytest.fixture(scope="session")
def demo_repo(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo detector exported both ways: `demo-ts` (TorchScript), `demo-onnx` (ONNX)."""
    repo = tmp_path_factory.mktemp("repo-demo")
    for fmt, name in (("torchscript", "demo-ts"), ("onnx", "demo-onnx")):
        export_detector("tiny_fasterrcnn", repo, weights=str(demo_checkpoint), fmt=fmt,
                        name=name, check=False)
        pin_batching(repo / name)
    return repo


@pytest.fixture(scope="session")
def every_task_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model per task: the demo detector and the demo action classifier (shipped
    weights), a ResNet-18 classifier and an LR-ASPP segmenter (random weights), batching
    pinned so that a service starts without measuring."""
    from cvserve.models.classifiers import export_resnet
    from cvserve.models.segment_export import export_segmenter
    from cvserve.models.train_video import export_demo_actions

    repo = tmp_path_factory.mktemp("every-task-repo")
    export_detector("tiny_fasterrcnn", repo, weights=str(DEMO_CHECKPOINT),
                    name="demo-detector", check=False)
    export_demo_actions(repo)
    export_resnet("resnet18", repo, weights="random", check=False)
    export_segmenter("lraspp_mobilenet_v3_large", repo, weights="random", check=False)
    for name in ("demo-detector", "demo-actions", "resnet18", "lraspp_mobilenet_v3_large"):
        pin_batching(repo / name)
    return repo


def pin_batching(model_dir: Path) -> None:
    """Batch as model.toml says, not as measured: tests of batched results need batches
    whatever this machine's load makes of the warm-up measurement."""
    toml = model_dir / "model.toml"
    toml.write_text(toml.read_text().replace("[batching]\n", '[batching]\npolicy = "fixed"\n'))


@pytest.fixture(scope="session")
def demo_service(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Service]:
    """`cvserve run` serving demo-ts and demo-onnx."""
    with embedded_service({"CVSERVE_MODEL_REPOSITORY": str(demo_repo)},
                          tmp_path_factory.mktemp("logs")) as svc:
        yield svc


def iou(a: dict, b: dict) -> float:
    """IoU of two {x1, y1, x2, y2} boxes."""
    ix = max(0.0, min(a["x2"], b["x2"]) - max(a["x1"], b["x1"]))
    iy = max(0.0, min(a["y2"], b["y2"]) - max(a["y1"], b["y1"]))
    inter = ix * iy
    union = ((a["x2"] - a["x1"]) * (a["y2"] - a["y1"]) + (b["x2"] - b["x1"]) * (b["y2"] - b["y1"])
             - inter)
    return inter / union if union > 0 else 0.0


def batch_counts(url: str, model: str) -> tuple[float, float]:
    """(model executions, items run) so far: the cvserve_inference_batch_size histogram's
    count and sum for one model, from a service's /metrics."""
    text = httpx.get(f"{url}/metrics").text

    def value(name: str) -> float:
        m = re.search(rf'^cvserve_inference_batch_size_{name}{{model="{model}"}} (\S+)', text,
                      re.M)
        return float(m.group(1)) if m else 0.0

    return value("count"), value("sum")

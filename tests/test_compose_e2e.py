"""docker-compose's topology as plain processes: the api and worker services' own commands
and environment from docker-compose.yml (two api processes, two workers), a Redis of the
test's own, and a real Prometheus scraping them with docker/prometheus.yml's jobs. Then
load, and the metrics read back through Prometheus's query API; then graceful stops.

The api processes run with torch, onnxruntime, OpenCV, pycocotools and NumPy unimportable,
as in the slim api image."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from cvserve.models.synthetic import make_scene

from .conftest import REPO_ROOT, free_port

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
DASHBOARD = json.loads((REPO_ROOT / "docker/grafana/dashboards/cvserve.json").read_text())
MODEL = "demo-ts"
GOOD, CONCURRENCY = 64, 16

BLOCKER = """
import importlib.abc, sys
HEAVY = {"torch", "torchvision", "onnxruntime", "onnx", "cv2", "pycocotools", "numpy"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{name} is not in the api image")
sys.meta_path.insert(0, Block())
"""

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="needs a Prometheus server: `apt-get install prometheus` (Debian's package; "
           ".ci/run installs it where it can)")


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log_path = name, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=REPO_ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def service_env(service: str, **overrides: str) -> dict[str, str]:
    spec = COMPOSE["services"][service]
    env = {k: str(v) for k, v in spec["environment"].items()}
    return {**os.environ, "PYTHONUNBUFFERED": "1", **env, **overrides}


def command(service: str) -> list[str]:
    argv = list(COMPOSE["services"][service]["command"])
    exe = shutil.which(argv[0])
    return [exe, *argv[1:]] if exe else [sys.executable, "-m", "cvserve.app.cli", *argv[1:]]


@dataclass
class Topology:
    api_url: str
    prom_url: str
    redis: redis.Redis
    prefix: str
    api: Proc
    workers: list[Proc]
    metrics_ports: list[int]

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.prom_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def wait_for(what: str, check, timeout: float = 60, logs: tuple[Proc, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"{what} within {timeout} s\n" +
                         "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in logs))


@pytest.fixture(scope="module")
def topology(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp("compose")
    procs: list[Proc] = []
    redis_port, api_port, prom_port = free_port(), free_port(), free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "",
                                   "--appendonly", "no", "--bind", "127.0.0.1"],
                                  stdout=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    client = redis.Redis.from_url(redis_url)
    wait_for("redis answers", lambda: _ping(client), 10)
    prefix = "cvserve"
    try:
        # The compose file's commands and environment; what differs on one host: Redis's
        # and each port's address, the model repository, and threads for two cores.
        (tmp / "blocker").mkdir()
        (tmp / "blocker" / "sitecustomize.py").write_text(BLOCKER)
        api = Proc("api", command("api"), service_env(
            "api", CVSERVE_REDIS_URL=redis_url, CVSERVE_HOST="127.0.0.1",
            CVSERVE_PORT=str(api_port), CVSERVE_GRPC_PORT=str(free_port()),
            PROMETHEUS_MULTIPROC_DIR=str(tmp / "metrics"),
            PYTHONPATH=str(tmp / "blocker")), tmp / "api.log")
        procs.append(api)
        ports = [free_port(), free_port()]
        workers = []
        for i, port in enumerate(ports):
            workers.append(Proc(f"worker{i}", command("worker-cpu"), service_env(
                "worker-cpu", CVSERVE_REDIS_URL=redis_url, CVSERVE_HOST="127.0.0.1",
                CVSERVE_WORKER_METRICS_PORT=str(port),
                CVSERVE_MODEL_REPOSITORY=str(demo_repo), CVSERVE_MODELS=MODEL,
                CVSERVE_INTRA_OP_THREADS="1", CVSERVE_DECODE_THREADS="1",
                # Jobs a stopping worker hands back must not wait for this to pass.
                CVSERVE_VISIBILITY_TIMEOUT_MS="120000"), tmp / f"worker{i}.log"))
        procs.extend(workers)

        config = yaml.safe_load((REPO_ROOT / "docker/prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        local = {"api": [f"127.0.0.1:{api_port}"],
                 "worker": [f"127.0.0.1:{p}" for p in ports], "worker-cpu": []}
        for job in config["scrape_configs"]:
            names = [n for sd in job.pop("dns_sd_configs") for n in sd["names"]]
            job["static_configs"] = [{"targets": [t for n in names for t in local[n]]}]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = Proc("prometheus", ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}"],
                    dict(os.environ), tmp / "prometheus.log")
        procs.append(prom)

        topo = Topology(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}",
                        client, prefix, api, workers, ports)

        def two_workers() -> bool:
            try:
                models = httpx.get(f"{topo.api_url}/models", timeout=3).json()["models"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return any(m["name"] == MODEL and len(m["workers"]) == 2 for m in models)

        wait_for("two workers serve the model", two_workers, 180, tuple(procs))
        wait_for("every worker's metrics port answers", lambda: all(
            _up(f"http://127.0.0.1:{p}/metrics") for p in ports), 60, tuple(procs))
        wait_for("Prometheus scrapes all three targets", lambda: (
            topo.value('count(up{job=~"cvserve-.*"} == 1)') == 3), 60, tuple(procs))
        yield topo
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGKILL if proc.name == "prometheus" else signal.SIGTERM)
        redis_proc.kill()
        redis_proc.wait()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def detect(url: str, data: bytes, content_type: str = "image/jpeg") -> int:
    return httpx.post(f"{url}/detect", params={"timeout_s": 60},
                      files={"file": ("f", data, content_type)}, timeout=90).status_code


def test_prometheus_reads_back_what_was_sent(topology: Topology) -> None:
    jpegs = [make_scene(seed, 320, 240).jpeg() for seed in range(GOOD)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        codes = list(pool.map(lambda d: detect(topology.api_url, d), jpegs))
    assert codes == [200] * GOOD
    # Refused by the api (not an image), and by a worker (a JPEG cut short: its header
    # passes the api's check, its pixels do not decode).
    assert detect(topology.api_url, b"plain text", "text/plain") == 415
    assert detect(topology.api_url, jpegs[0][:len(jpegs[0]) // 3]) == 415
    sent = GOOD + 2

    detect_count = 'sum(cvserve_http_requests_total{endpoint="/detect"})'
    wait_for("Prometheus counts every /detect request",
             lambda: topology.value(detect_count) == sent, 30, (topology.api,))
    # Two api processes, one count: the multiprocess exposition sums them.
    assert topology.value('sum(cvserve_http_requests_total{endpoint="/detect",'
                          'status="200"})') == GOOD
    assert topology.value('sum(cvserve_http_requests_total{endpoint="/detect",'
                          'status="415"})') == 2
    wait_for("the workers' counts reach Prometheus", lambda: topology.value(
        f'sum(cvserve_inference_request_success_total{{model="{MODEL}"}})') == GOOD, 30)
    wait_for("the worker's refusal reaches Prometheus", lambda: topology.value(
        'sum(cvserve_inference_request_failure_total'
        f'{{model="{MODEL}",code="unsupported_media"}})') == 1, 30)
    # Both workers served, and batches larger than one were formed.
    per_worker = topology.query(f'cvserve_inference_request_success_total{{model="{MODEL}"}}')
    assert len(per_worker) == 2 and all(float(s["value"][1]) > 0 for s in per_worker)
    batches = topology.value(f'sum(cvserve_inference_batch_size_count{{model="{MODEL}"}})')
    singles = topology.value(f'sum(cvserve_inference_batch_size_bucket{{model="{MODEL}",'
                             'le="1.0"})')
    assert batches is not None and singles is not None and singles < batches
    assert topology.value(f'max(cvserve_model_workers{{model="{MODEL}"}})') == 2
    assert topology.value(f'max(cvserve_queue_depth{{model="{MODEL}"}})') == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with prometheus")
def test_metrics_pass_promtool(topology: Topology) -> None:
    urls = [f"{topology.api_url}/metrics",
            *(f"http://127.0.0.1:{p}/metrics" for p in topology.metrics_ports)]
    for url in urls:
        body = httpx.get(url, timeout=10).content
        check = subprocess.run(["promtool", "check", "metrics"], input=body,
                               capture_output=True, timeout=30)
        assert check.returncode == 0 and not check.stdout and not check.stderr, (
            f"{url}: {check.stdout.decode()} {check.stderr.decode()}")


def test_every_dashboard_query_returns_data(topology: Topology) -> None:
    exprs = {t["expr"]: p["title"] for p in DASHBOARD["panels"] for t in p.get("targets", [])}
    gpu = [e for e in exprs if "cvserve_gpu_" in e]
    assert gpu and all(topology.query(e) == [] for e in gpu)  # no GPU here: absent, not 0
    # rate() needs two scrapes of a series: the last test's errors made theirs just now.
    empty = [e for e in exprs if e not in gpu]
    deadline = time.monotonic() + 20
    while empty and time.monotonic() < deadline:
        empty = [e for e in empty if not topology.query(e)]
        time.sleep(0.5)
    assert not empty, "panels without data:\n" + "\n".join(f"{exprs[e]}: {e}" for e in empty)


def test_sigterm_on_a_worker_answers_or_hands_back_every_job(topology: Topology) -> None:
    leaving, staying = topology.workers
    jpegs = [make_scene(seed, 320, 240).jpeg() for seed in range(48)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(detect, topology.api_url, d) for d in jpegs]
        time.sleep(0.5)  # jobs are queued and held by both workers
        assert leaving.stop(signal.SIGTERM, timeout=60) == 0
        codes = [f.result() for f in futures]
    assert codes == [200] * len(jpegs)
    # Handed back, not left to the 120 s visibility timeout.
    assert time.monotonic() - t0 < 60
    assert "stopping: no new jobs" in leaving.log()
    assert staying.proc.poll() is None


def test_sigterm_on_the_api_answers_requests_in_flight(topology: Topology) -> None:
    worker = next(w for w in topology.workers if w.proc.poll() is None)
    stream = f"{topology.prefix}:jobs:{MODEL}"
    jpegs = [make_scene(seed, 320, 240).jpeg() for seed in range(12)]
    worker.proc.send_signal(signal.SIGSTOP)  # requests pile up in the queue
    try:
        with ThreadPoolExecutor(len(jpegs)) as pool:
            futures = [pool.submit(detect, topology.api_url, d) for d in jpegs]
            wait_for("every request is queued",
                     lambda: topology.redis.xlen(stream) == len(jpegs), 30)
            topology.api.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the api has stopped accepting, its requests still wait
            assert topology.api.proc.poll() is None
            worker.proc.send_signal(signal.SIGCONT)
            codes = [f.result() for f in futures]
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    assert codes == [200] * len(jpegs)
    assert topology.api.proc.wait(30) == 0

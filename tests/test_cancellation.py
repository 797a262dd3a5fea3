"""A request whose client leaves is dropped before it reaches the model, in both modes."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from cvserve.models.synthetic import make_scene

from .conftest import Service, embedded_service, free_port
from .costed_models import PerImage, write_model

MODEL = "slow"


def counter(metrics_url: str, pattern: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    m = re.search(pattern + r" (\S+)", text)
    return float(m.group(1)) if m else 0.0


def executions(metrics_url: str) -> float:
    return counter(metrics_url, rf'cvserve_inference_exec_total{{model="{MODEL}"}}')


def dropped(metrics_url: str) -> float:
    return counter(metrics_url, r'cvserve_inference_cancelled_total\{model="slow",'
                                r'reason="client_disconnected"\}')


def leave_early(url: str, data: bytes) -> None:
    """A client that gives up after 0.3 s and closes its connection."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/detect", params={"model": MODEL}, content=data, timeout=0.3,
                   headers={"content-type": "image/jpeg"})


def check_disconnected_job_never_runs(url: str, metrics_url: str) -> None:
    data = make_scene(1, 320, 240).jpeg()
    before, dropped_before = executions(metrics_url), dropped(metrics_url)
    results: list[int] = []

    def patient() -> None:
        r = httpx.post(f"{url}/detect", params={"model": MODEL}, content=data, timeout=120,
                       headers={"content-type": "image/jpeg"})
        results.append(r.status_code)

    first = threading.Thread(target=patient)
    first.start()
    time.sleep(0.1)  # the first job is on the model (about a second of work)
    leave_early(url, data)  # queued behind it; its client leaves while it waits
    last = threading.Thread(target=patient)
    last.start()
    first.join()
    last.join()
    assert results == [200, 200]
    deadline = time.monotonic() + 10
    while dropped(metrics_url) - dropped_before < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dropped(metrics_url) - dropped_before == 1
    assert executions(metrics_url) - before == 2, "the abandoned job never ran"


def slow_repo(root: Path) -> Path:
    # About 1.2 s per image on an idle 2-core machine (0.4 s at 200 steps was too close to
    # the leaving client's 0.4 s: the first job could finish before it left), one image per
    # batch: a job waits behind another.
    write_model(root, MODEL, PerImage(600), 'max_batch_size = 1\npolicy = "fixed"')
    return root


def test_embedded_client_disconnect_drops_the_job(tmp_path: Path) -> None:
    repo = slow_repo(tmp_path / "repo")
    with embedded_service({"CVSERVE_MODEL_REPOSITORY": str(repo)}, tmp_path) as svc:
        check_disconnected_job_never_runs(svc.url, f"{svc.url}/metrics")


def test_redis_client_disconnect_drops_the_job(tmp_path: Path, redis_url: str,
                                               redis_prefix: str,
                                               services: list[Service]) -> None:
    repo = slow_repo(tmp_path / "repo")
    metrics_port = free_port()
    env = {"CVSERVE_REDIS_URL": redis_url, "CVSERVE_KEY_PREFIX": redis_prefix,
           "CVSERVE_MODEL_REPOSITORY": str(repo)}
    services.append(Service("worker", {**env, "CVSERVE_WORKER_METRICS_PORT": str(metrics_port)},
                            tmp_path).start())
    api = Service("api", env, tmp_path, port=free_port()).start()
    services.append(api)
    api.wait_ready(120)
    check_disconnected_job_never_runs(api.url, f"http://127.0.0.1:{metrics_port}/metrics")

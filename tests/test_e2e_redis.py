"""`cvserve api` + `cvserve worker` as separate processes over Redis, over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from cvserve.models.synthetic import make_scene

from .conftest import Service, free_port

MODEL = "frcnn-ts"  # the random_repo fixture's detector


def redis_env(redis_url: str, prefix: str, repo: Path, **extra: str) -> dict[str, str]:
    return {"CVSERVE_REDIS_URL": redis_url, "CVSERVE_KEY_PREFIX": prefix,
            "CVSERVE_MODEL_REPOSITORY": str(repo),
            # Two cores shared by every process of a test: one model thread each.
            "CVSERVE_INTRA_OP_THREADS": "1", "CVSERVE_DECODE_THREADS": "1", **extra}


def consumer_prefix(worker: Service) -> str:
    """How a worker's consumer name in the job group starts: {host}:{pid}: (then a random
    suffix, docs/design.md §9)."""
    assert worker.proc is not None
    return f"{socket.gethostname()}:{worker.proc.pid}:"


def wait_for_workers(api: Service, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = httpx.get(f"{api.url}/models", timeout=5).json()["models"]
        if any(m["name"] == MODEL and len(m["workers"]) >= n for m in models):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{n} workers did not register in {timeout} s:\n{api.log()}")


def wait_until_drained(client: redis.Redis, stream: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.xlen(stream) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.xlen(stream) == 0, f"{stream} still holds jobs after {timeout} s"


def detect(api: Service, seed: int, timeout_s: float = 60.0) -> httpx.Response:
    data = make_scene(seed, 320, 240).jpeg()
    return httpx.post(f"{api.url}/detect", params={"timeout_s": timeout_s, "score_threshold": 0},
                      files={"file": ("scene.jpg", data, "image/jpeg")}, timeout=timeout_s + 30)


def assert_error_shape(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code and body["error"]["message"]


@dataclass
class Deployment:
    api: Service
    worker: Service
    readyz_before_any_worker: httpx.Response
    redis: redis.Redis
    prefix: str


@pytest.fixture(scope="module")
def deployment(redis_url: str, random_repo: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One api and one worker. max_queue=2 so that two queued jobs fill it; a 10 s heartbeat
    so that a worker paused by SIGSTOP stays registered for the overload test."""
    prefix = f"cvserve-test-e2e-{os.urandom(5).hex()}"
    env = redis_env(redis_url, prefix, random_repo, CVSERVE_MAX_QUEUE="2",
                    CVSERVE_HEARTBEAT_S="10")
    logs = tmp_path_factory.mktemp("logs-redis")
    client = redis.Redis.from_url(redis_url)
    api = Service("api", env, logs, port=free_port()).start()
    worker = Service("worker", env, logs)
    try:
        api.wait_log("Application startup complete", timeout=60)
        alone = httpx.get(f"{api.url}/readyz", timeout=5)
        worker.start()
        api.wait_ready(timeout=120)
        yield Deployment(api, worker, alone, client, prefix)
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGCONT)  # in case a test left it paused
        worker.stop()
        api.stop()
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


# --- serving -----------------------------------------------------------------------------
def test_api_and_worker_processes_serve_detect(deployment: Deployment) -> None:
    r = detect(deployment.api, seed=1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["image"] == {"width": 320, "height": 240}
    assert body["detections"], "score_threshold=0 keeps the random model's boxes"
    assert {"queue", "preprocess", "inference", "postprocess", "total"} <= set(body["timing"])
    # Acknowledged and deleted once answered (the reply is written first, so allow a moment).
    wait_until_drained(deployment.redis, f"{deployment.prefix}:jobs:{MODEL}", timeout=5)


def test_models_lists_the_model_with_the_worker_serving_it(deployment: Deployment) -> None:
    models = httpx.get(f"{deployment.api.url}/models", timeout=5).json()["models"]
    [m] = [m for m in models if m["name"] == MODEL]
    assert m["task"] == "detection" and m["backend"] == "torchscript"
    [worker] = m["workers"]
    assert worker.startswith(consumer_prefix(deployment.worker))


def test_readyz_is_503_until_a_worker_registers_then_200(deployment: Deployment) -> None:
    alone = deployment.readyz_before_any_worker
    assert_error_shape(alone, 503, "overloaded")
    assert alone.headers["retry-after"]
    ready = httpx.get(f"{deployment.api.url}/readyz", timeout=5)
    assert ready.status_code == 200 and MODEL in ready.json()["models"]


# --- deadlines and backpressure ----------------------------------------------------------
def test_deadline_shorter_than_the_work_answers_504(deployment: Deployment) -> None:
    r = detect(deployment.api, seed=2, timeout_s=0.001)
    assert_error_shape(r, 504, "deadline_exceeded")
    assert "timeout_s" in r.json()["error"]["message"], "names the setting to change"


def test_queue_over_max_queue_answers_503_with_retry_after(deployment: Deployment) -> None:
    worker, stream = deployment.worker, f"{deployment.prefix}:jobs:{MODEL}"
    assert worker.proc is not None
    wait_until_drained(deployment.redis, stream)  # e.g. an earlier test's expired job
    worker.proc.send_signal(signal.SIGSTOP)  # registered, but takes no jobs
    with ThreadPoolExecutor(2) as pool:
        try:
            queued = [pool.submit(detect, deployment.api, seed) for seed in (3, 4)]
            deadline = time.monotonic() + 30
            while deployment.redis.xlen(stream) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert deployment.redis.xlen(stream) == 2

            r = detect(deployment.api, seed=5)
            assert_error_shape(r, 503, "overloaded")
            assert int(r.headers["retry-after"]) >= 1
            assert "max_queue=2" in r.json()["error"]["message"]
        finally:
            worker.proc.send_signal(signal.SIGCONT)
        # Nothing queued was dropped: both answer once the worker resumes.
        assert [f.result().status_code for f in queued] == [200, 200]


# --- a worker dies -----------------------------------------------------------------------
def test_worker_killed_mid_batch_loses_no_request(
        redis_url: str, redis_prefix: str, random_repo: Path, tmp_path: Path) -> None:
    env = redis_env(redis_url, redis_prefix, random_repo, CVSERVE_VISIBILITY_TIMEOUT_MS="2000")
    api = Service("api", env, tmp_path, port=free_port()).start()
    victim, survivor = Service("worker", env, tmp_path), Service("worker", env, tmp_path)
    client = redis.Redis.from_url(redis_url)
    try:
        victim.start()
        survivor.start()
        api.wait_log("Application startup complete", timeout=60)
        wait_for_workers(api, 2)

        timeout_s = 60.0
        results: list[tuple[int, float, httpx.Response | Exception]] = []
        lock = threading.Lock()

        def one(seed: int) -> None:
            t0 = time.monotonic()
            try:
                r: httpx.Response | Exception = detect(api, seed, timeout_s)
            except httpx.HTTPError as exc:
                r = exc
            with lock:
                results.append((seed, time.monotonic() - t0, r))

        threads = [threading.Thread(target=one, args=(seed,)) for seed in range(16)]
        for t in threads:
            t.start()
        # SIGKILL the victim while it holds several jobs: decoding, batching or running them.
        stream, victim_prefix = f"{redis_prefix}:jobs:{MODEL}", consumer_prefix(victim)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            held = sum(c["pending"] for c in client.xpending(stream, "workers")["consumers"]
                       if c["name"].decode().startswith(victim_prefix))
            if held >= 3:
                break
            time.sleep(0.02)
        assert held >= 3, f"the victim never held 3 jobs:\n{victim.log()}"
        victim.kill()
        for t in threads:
            t.join(timeout_s + 40)

        assert len(results) == 16, "a request hung past its deadline"
        for seed, elapsed, r in results:
            assert isinstance(r, httpx.Response), f"request {seed} failed: {r!r}"
            assert elapsed < timeout_s + 5, f"request {seed} took {elapsed:.1f} s"
            if r.status_code != 200:  # an explicit error, never a hang or a bare 500
                assert set(r.json()["error"]) == {"code", "message"}, r.text
        assert sum(r.status_code == 200 for _, _, r in results) == 16, [
            (seed, r.status_code, r.text[:200]) for seed, _, r in results
            if isinstance(r, httpx.Response) and r.status_code != 200]
        assert "reclaimed job" in survivor.log(), survivor.log()
        wait_until_drained(client, stream, timeout=5)  # every job answered and acknowledged
    finally:
        for svc in (victim, survivor, api):
            svc.stop()
        client.close()

"""Batching follows measured gain, and a model is warmed up before the service is ready."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cvserve.models.synthetic import make_scene
from cvserve.worker.policy import candidate_sizes, choose

from .conftest import Service, embedded_service, free_port
from .costed_models import PerCall, PerImage, write_model
from .test_batching import batch_histogram

DELAY_MS = 400  # long enough that a wait would show in a single request's latency


def test_a_flat_curve_forms_no_batches_and_never_waits() -> None:
    assert choose({1: 80.0, 2: 84.0, 4: 82.0, 8: 86.0}, 5.0) == (1, 0.0)


def test_batches_grow_while_throughput_does() -> None:
    assert choose({1: 3.0, 2: 5.7, 4: 6.0, 8: 6.1}, 5.0) == (2, 5.0)
    assert choose({1: 100.0, 2: 190.0, 4: 350.0, 8: 600.0}, 5.0) == (8, 5.0)
    # A dip does not stop the search: the best size counts, measured against the best
    # smaller one.
    assert choose({1: 10.0, 2: 9.0, 4: 15.0}, 2.0) == (4, 2.0)


def test_candidate_sizes() -> None:
    assert candidate_sizes(1, None) == [1]
    assert candidate_sizes(6, None) == [1, 2, 4, 6]
    assert candidate_sizes(8, None) == [1, 2, 4, 8]
    assert candidate_sizes(4, [1, 2, 4, 8]) == [1, 2, 4]


@pytest.fixture(scope="module")
def costed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    repo = tmp_path_factory.mktemp("repo-costed")
    write_model(repo, "per-image", PerImage(10),
                f"max_batch_size = 4\nmax_queue_delay_ms = {DELAY_MS}")
    write_model(repo, "per-call", PerCall(60),
                f"max_batch_size = 4\nmax_queue_delay_ms = {DELAY_MS}")
    with embedded_service({"CVSERVE_MODEL_REPOSITORY": str(repo)},
                          tmp_path_factory.mktemp("logs")) as svc:
        yield svc


def post(url: str, model: str, data: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/detect", params={"model": model}, content=data,
                   headers={"content-type": "image/jpeg"}, timeout=60)
    return r.status_code, (time.perf_counter() - t0) * 1000


def burst(url: str, model: str, images: list[bytes]) -> tuple[list[int], float, float]:
    """All images at once: (statuses, model executions, executions of batch size 1)."""
    before = batch_histogram(url, model)
    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(lambda d: post(url, model, d), images))
    after = batch_histogram(url, model)
    return [status for status, _ in answers], after[0] - before[0], after[1] - before[1]


def policy(url: str, model: str) -> dict:
    return httpx.get(f"{url}/models/{model}").json()["batching_policy"]


def test_flat_model_is_served_without_queue_delay(costed: Service) -> None:
    p = policy(costed.url, "per-image")
    assert p["source"] == "measured" and set(p["throughput"]) == {"1", "2", "4"}
    assert p["max_batch_size"] == 1 and p["max_queue_delay_ms"] == 0, p
    images = [make_scene(i, 320, 240).jpeg() for i in range(6)]
    statuses, runs, runs_of_one = burst(costed.url, "per-image", images)
    assert all(status == 200 for status in statuses)
    assert runs == runs_of_one == 6, "six batches of one"
    status, ms = post(costed.url, "per-image", images[0])
    assert status == 200 and ms < DELAY_MS, f"a lone request took {ms:.0f} ms"


def test_model_that_gains_from_batching_gets_batches(costed: Service) -> None:
    p = policy(costed.url, "per-call")
    assert p["max_batch_size"] >= 2 and p["max_queue_delay_ms"] == DELAY_MS, p
    assert p["throughput"]["4"] > 1.5 * p["throughput"]["1"]
    images = [make_scene(i, 320, 240).jpeg() for i in range(12)]
    statuses, runs, runs_of_one = burst(costed.url, "per-call", images)
    assert all(status == 200 for status in statuses)
    assert runs < 12 and runs_of_one < runs, (runs, runs_of_one)


def test_policy_metrics_are_exported(costed: Service) -> None:
    text = httpx.get(f"{costed.url}/metrics").text
    assert 'cvserve_batch_policy_max_batch_size{model="per-image"} 1.0' in text
    assert 'cvserve_batch_throughput_images_per_second{batch_size="4",model="per-call"}' in text


def test_pinned_policy_is_used_as_written(tmp_path: Path) -> None:
    write_model(tmp_path, "pinned", PerImage(2),
                "max_batch_size = 4\nmax_queue_delay_ms = 3\npolicy = \"fixed\"")
    with embedded_service({"CVSERVE_MODEL_REPOSITORY": str(tmp_path)}, tmp_path) as svc:
        p = policy(svc.url, "pinned")
    assert (p["source"], p["max_batch_size"], p["max_queue_delay_ms"]) == ("model.toml", 4, 3)


def test_ready_only_after_warm_up(tmp_path: Path, redis_url: str, redis_prefix: str,
                                  services: list[Service]) -> None:
    """Redis mode, api first: /readyz is 503 until the worker has warmed its model up."""
    write_model(tmp_path, "per-call", PerCall(60), "max_batch_size = 8")
    env = {"CVSERVE_REDIS_URL": redis_url, "CVSERVE_KEY_PREFIX": redis_prefix,
           "CVSERVE_MODEL_REPOSITORY": str(tmp_path)}
    api = Service("api", env, tmp_path, port=free_port()).start()
    services.append(api)
    deadline = time.monotonic() + 60
    while True:
        try:
            assert httpx.get(f"{api.url}/readyz", timeout=2).status_code == 503
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, api.log()
            time.sleep(0.2)
    worker = Service("worker", env, tmp_path).start()
    services.append(worker)
    seen_503 = 0
    while httpx.get(f"{api.url}/readyz", timeout=2).status_code != 200:
        seen_503 += 1
        assert time.monotonic() < deadline + 60, worker.log()
        time.sleep(0.05)
    assert "per-call: warm-up took" in worker.log()
    assert seen_503 > 0

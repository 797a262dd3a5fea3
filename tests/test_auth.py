"""API keys and per-key rate limits, over real HTTP and gRPC (app/auth.py)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from cvserve.client import Client, CvserveHTTPError
from cvserve.models.synthetic import make_scene

from .conftest import Service, free_port

MODEL = "demo-ts"
LIMIT = 6


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def away_from_the_minute_boundary() -> None:
    """Counts are per clock minute: start a counting test well inside one."""
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)


@pytest.fixture(scope="module")
def keyed(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`cvserve run` with keys k1 and k2 from settings and k3 from a file, a rate limit, and
    gRPC on."""
    tmp = tmp_path_factory.mktemp("auth")
    repo = tmp / "repo"
    shutil.copytree(demo_repo / MODEL, repo / MODEL)
    (tmp / "keys.txt").write_text("# more keys\nk3\n\n")
    grpc_port = free_port()
    svc = Service("run", {"CVSERVE_MODEL_REPOSITORY": str(repo),
                          "CVSERVE_AUTO_BUILD_DEFAULT": "false",
                          "CVSERVE_API_KEYS": "k1,k2",
                          "CVSERVE_API_KEYS_FILE": str(tmp / "keys.txt"),
                          "CVSERVE_RATE_LIMIT_PER_MINUTE": str(LIMIT),
                          "CVSERVE_GRPC_PORT": str(grpc_port)},
                  tmp, port=free_port()).start()
    svc.grpc_url = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
    try:
        yield svc.wait_ready(120)  # /readyz is open by default
    finally:
        svc.stop()


def test_requests_need_a_valid_key(keyed: Service) -> None:
    image = make_scene(3).jpeg()
    for headers, why in (({}, "needs an API key"), (bearer("nope"), "not valid"),
                         ({"Authorization": "Basic azE6"}, "needs an API key")):
        r = httpx.post(f"{keyed.url}/detect", files={"file": ("s.jpg", image)},
                       headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized" and why in r.json()["error"][
            "message"]
    for key in ("k1", "k3"):  # from the settings and from the file
        r = httpx.post(f"{keyed.url}/detect", files={"file": ("s.jpg", image)},
                       headers=bearer(key), timeout=60)
        assert r.status_code == 200 and r.json()["model"] == MODEL
    assert httpx.get(f"{keyed.url}/models").status_code == 401
    assert httpx.get(f"{keyed.url}/v2/models/{MODEL}").status_code == 401


def test_health_metrics_page_and_docs_stay_open(keyed: Service) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/docs",
                 "/openapi.json", "/v2/health/live"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 200, path


def test_each_key_has_its_own_rate_limit(keyed: Service) -> None:
    away_from_the_minute_boundary()
    codes = [httpx.get(f"{keyed.url}/models", headers=bearer("k2")).status_code
             for _ in range(LIMIT + 2)]
    assert codes == [200] * LIMIT + [429, 429]
    over = httpx.get(f"{keyed.url}/models", headers=bearer("k2"))
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(over.headers["retry-after"]) <= 60
    # Another key is not held back by k2's count.
    assert httpx.get(f"{keyed.url}/models", headers=bearer("k3")).status_code == 200


def test_the_client_sends_its_key(keyed: Service) -> None:
    with Client(keyed.url, api_key="k1") as client:
        assert client.detect(make_scene(4).jpeg()).model == MODEL
    with Client(keyed.url, retries=0) as client, pytest.raises(CvserveHTTPError) as err:
        client.models()
    assert err.value.status == 401


def test_grpc_needs_the_key_too(keyed: Service) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(keyed.grpc_url)  # type: ignore[attr-defined]
    assert client.is_server_live()  # a health check: open
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata(MODEL)
    assert "UNAUTHENTICATED" in str(err.value.status())
    meta = client.get_model_metadata(MODEL, headers={"authorization": "Bearer k1"})
    assert meta.name == MODEL
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([make_scene(5).jpeg()], dtype=np.object_))
    result = client.infer(MODEL, [image], headers={"authorization": "Bearer k3"})
    assert result.as_numpy("count").shape == (1,)


def test_protected_health_and_a_limit_shared_by_api_processes(
        demo_repo: Path, redis_url: str, redis_prefix: str, tmp_path: Path,
        services: list[Service]) -> None:
    """Redis mode, two api processes: /healthz and /metrics need a key, and one key's count
    is kept in Redis, so the limit holds across both processes."""
    env = {"CVSERVE_REDIS_URL": redis_url, "CVSERVE_KEY_PREFIX": redis_prefix,
           "CVSERVE_MODEL_REPOSITORY": str(demo_repo), "CVSERVE_MODELS": MODEL,
           "CVSERVE_API_KEYS": "secret", "CVSERVE_PROTECT_HEALTH": "true",
           "CVSERVE_PROTECT_METRICS": "true", "CVSERVE_RATE_LIMIT_PER_MINUTE": str(LIMIT)}
    api = Service("api", env, tmp_path, port=free_port(), args=("--workers", "2")).start()
    services.append(api)
    api.wait_log("Application startup complete")
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{api.url}{path}").status_code == 401, path
    assert httpx.get(f"{api.url}/healthz", headers=bearer("secret")).status_code == 200
    away_from_the_minute_boundary()
    # Fresh connections each: the kernel spreads them over both processes.
    codes = [httpx.get(f"{api.url}/models", headers=bearer("secret")).status_code
             for _ in range(LIMIT + 3)]
    assert codes.count(429) >= 3, codes  # 1 request above was counted too
    counted = list(redis.Redis.from_url(redis_url).scan_iter(
        match=f"{redis_prefix}:ratelimit:*"))
    assert counted and all(b"secret" not in key for key in counted)  # a hash, not the key

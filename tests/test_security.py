"""Redis with a password over TLS; nothing from a request reaches the filesystem or the
network (no paths, no URLs fetched)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from cvserve.models.synthetic import make_scene

from .conftest import Service, free_port

MODEL = "demo-ts"
PASSWORD = "s3cret-pw"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of the test's own that takes only TLS, with a password."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file",
         str(tmp_path / "key.pem"), "--tls-ca-cert-file", str(tmp_path / "cert.pem"),
         "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'cert.pem'}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(url) as client:
                    client.ping()
                break
            except redis.RedisError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("this redis-server does not serve TLS")
                time.sleep(0.1)
        yield url
    finally:
        server.kill()
        server.wait()


def test_api_and_worker_over_tls_with_a_password(tls_redis: str, demo_repo: Path,
                                                 tmp_path: Path,
                                                 services: list[Service]) -> None:
    env = {"CVSERVE_REDIS_URL": tls_redis, "CVSERVE_MODEL_REPOSITORY": str(demo_repo),
           "CVSERVE_MODELS": MODEL}
    services.append(Service("worker", env, tmp_path).start())
    api = Service("api", env, tmp_path, port=free_port()).start()
    services.append(api)
    api.wait_ready(120)
    r = httpx.post(f"{api.url}/detect", files={"file": ("s.jpg", make_scene(5).jpeg())},
                   timeout=60)
    assert r.status_code == 200 and r.json()["model"] == MODEL
    # A wrong password: the api says the queue is unreachable, at once, and says why.
    wrong = tls_redis.replace(PASSWORD, "wrong")
    bad = Service("api", {**env, "CVSERVE_REDIS_URL": wrong}, tmp_path,
                  port=free_port()).start()
    services.append(bad)
    bad.wait_log("Application startup complete")
    t0 = time.monotonic()
    r = httpx.get(f"{bad.url}/readyz", timeout=30)
    assert r.status_code == 503 and time.monotonic() - t0 < 10
    for svc in services:  # the password is never written to a log
        assert PASSWORD not in svc.log()


def test_the_embedded_log_hides_the_redis_password(redis_url: str, redis_prefix: str,
                                                   demo_repo: Path, tmp_path: Path,
                                                   services: list[Service]) -> None:
    url = redis_url.replace("redis://", f"redis://:{PASSWORD}@", 1)  # no password set: ignored
    svc = Service("run", {"CVSERVE_REDIS_URL": url, "CVSERVE_KEY_PREFIX": redis_prefix,
                          "CVSERVE_MODEL_REPOSITORY": str(demo_repo), "CVSERVE_MODELS": MODEL},
                  tmp_path, port=free_port()).start()
    services.append(svc)
    svc.wait_log("cvserve run:")
    assert ":***@" in svc.log() and PASSWORD not in svc.log()


@pytest.mark.parametrize("path", [
    "/models/..%2F..%2F..%2Fetc%2Fpasswd", "/models/%2Fetc%2Fpasswd",
    "/models/..%2Fdemo-ts/filters.png", "/jobs/..%2F..%2Fetc%2Fpasswd",
    "/v2/models/..%2F..%2Fetc%2Fpasswd", "/static/..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/../../pyproject.toml",
])
def test_no_request_path_reaches_the_filesystem(demo_service: Service, path: str) -> None:
    r = httpx.get(f"{demo_service.url}{path}")
    assert r.status_code == 404, (path, r.status_code)
    assert "root:" not in r.text and "[project]" not in r.text


@pytest.mark.parametrize("model", ["../../etc/passwd", "/etc/passwd",
                                   "http://127.0.0.1:6379/", "file:///etc/passwd"])
def test_a_model_parameter_is_a_name_never_a_path_or_url(demo_service: Service,
                                                         model: str) -> None:
    r = httpx.post(f"{demo_service.url}/detect", params={"model": model},
                   files={"file": ("s.jpg", make_scene(6).jpeg())})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

"""Faults survived: Redis restarted under load (a test-owned redis-server on a free port,
killed and started again on the same port)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import httpx

from cvserve.models.synthetic import make_scene

from .conftest import Service, free_port

MODEL = "demo-ts"


def start_redis(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True
                         ).stdout.strip() != b"PONG":
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.05)
    return proc


def detect(url: str, seed: int, timeout_s: float = 20) -> httpx.Response:
    return httpx.post(f"{url}/detect", params={"timeout_s": timeout_s},
                      files={"file": ("s.jpg", make_scene(seed, 320, 240).jpeg())},
                      timeout=timeout_s + 10)


def test_redis_restarted_under_load(demo_repo: Path, tmp_path: Path,
                                    services: list[Service]) -> None:
    """While Redis is down the api answers 503 at once (not a hang); once it is back, api
    and worker reconnect by themselves (the job stream and its consumer group, gone with a
    Redis that keeps nothing, are made again) and serve within seconds."""
    port = free_port()
    server = start_redis(port)
    env = {"CVSERVE_REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "CVSERVE_MODEL_REPOSITORY": str(demo_repo), "CVSERVE_MODELS": MODEL,
           "CVSERVE_HEARTBEAT_S": "0.5"}
    try:
        services.append(Service("worker", env, tmp_path).start())
        api = Service("api", env, tmp_path, port=free_port()).start()
        services.append(api)
        api.wait_ready(120)

        # Load before, during and after the outage.
        stop, codes, lock = threading.Event(), [], threading.Lock()

        def load(seed: int) -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status = detect(api.url, seed).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    codes.append((status, t0, time.monotonic() - t0))
                time.sleep(0.05)

        threads = [threading.Thread(target=load, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        server.kill()
        server.wait()
        time.sleep(1)
        t0 = time.monotonic()
        down = detect(api.url, 99)
        assert down.status_code == 503 and time.monotonic() - t0 < 5, down.text
        assert down.json()["error"]["code"] == "overloaded" and "retry-after" in down.headers
        assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 503
        time.sleep(2)  # down for a while: both processes keep retrying

        server = start_redis(port)
        back = time.monotonic()
        probes = []
        while True:
            t1 = time.monotonic()
            status = detect(api.url, 100, timeout_s=5).status_code
            probes.append((round(t1 - back, 2), status, round(time.monotonic() - t1, 2)))
            if status == 200:
                break
            assert time.monotonic() - back < 30, f"not serving 30 s after Redis came back:\n" \
                f"{probes}\n{api.log()[-3000:]}\n{services[0].log()[-3000:]}"
            time.sleep(0.25)
        recovered = time.monotonic()
        recovered_s = recovered - back
        # Let the load run on until 8 requests sent after the recovery have been answered:
        # a client whose request went down with the old Redis waits out its deadline (20 s)
        # before it sends another, and all 4 may be such clients.
        while time.monotonic() - recovered < 30:
            with lock:
                if sum(started > recovered for _, started, _ in codes) >= 8:
                    break
            time.sleep(0.25)
        stop.set()
        for t in threads:
            t.join(60)
        assert recovered_s < 10, probes
        # Never a 500 and never a hang: 200 when up, 503 while down; requests caught in
        # flight by the outage may also end 504 (their job went with the old Redis).
        assert {c for c, _, _ in codes} <= {200, 503, 504}, codes
        assert all(elapsed < 35 for _, _, elapsed in codes)
        after = [c for c, started, _ in codes if started > recovered]
        assert after and set(after) == {200}, after
        for svc in services:
            assert svc.proc is not None and svc.proc.poll() is None, svc.log()[-2000:]
    finally:
        server.kill()
        server.wait()

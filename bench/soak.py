"""Soak: the service under steady mixed load for a long time, watched for errors, latency
drift and memory growth. A script, not a CI test.

    python bench/soak.py --minutes 30            # api + worker apart, over the local Redis
    python bench/soak.py --minutes 2 --embedded  # a quick look, one process

It serves the demo detector, the demo action classifier, a ResNet-18 (random weights) for
/explain and LR-ASPP (random weights) for /segment. It measures what one client at a time
gets through /detect, then runs closed-loop clients at --load (default 0.8) of that
capacity, mixing /detect (60 %), /segment (15 %), /explain cam (10 %), /classify-video
(10 %) and deliberate bad input (5 %, a text file: must be 415). Every minute it prints
requests served, errors by status, p50 / p99 latency of that minute, and the RSS of the
api and worker processes; at the end, the totals and RSS growth from the end of the first
minute, once warm-up allocations are done (target: no errors but the deliberate ones, RSS
growth under 10 %).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn's workers), in MiB."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    return [int(c) for c in found]


def build_repository(root: Path) -> None:
    from cvserve.models.classifiers import export_resnet
    from cvserve.models.export import DEMO_WEIGHTS, export_detector
    from cvserve.models.segment_export import export_segmenter
    from cvserve.models.train_video import export_demo_actions

    export_detector("tiny_fasterrcnn", root, weights=str(DEMO_WEIGHTS), name="demo-detector",
                    check=False)
    export_demo_actions(root)
    export_resnet("resnet18", root, weights="random", check=False)
    export_segmenter("lraspp_mobilenet_v3_large", root, weights="random", check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=0.8, help="fraction of measured capacity")
    p.add_argument("--embedded", action="store_true", help="one process, no Redis")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args(argv)

    from cvserve.models.synthetic import make_scene
    from cvserve.models.synthetic_video import make_action_video

    images = [make_scene(seed, 640, 480).jpeg() for seed in range(20)]
    video = make_action_video(5, 4.0).mp4()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        build_repository(repo)
        port = free_port()
        env = {**os.environ, "CVSERVE_MODEL_REPOSITORY": str(repo), "CVSERVE_PORT": str(port),
               "CVSERVE_AUTO_BUILD_DEFAULT": "false"}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        logs = open(Path(tmp) / "service.log", "wb")  # noqa: SIM115 - closed below
        python = [sys.executable, "-m", "cvserve.app.cli"]
        if args.embedded:
            procs["run"] = subprocess.Popen([*python, "run"], env=env, stdout=logs,
                                            stderr=subprocess.STDOUT)
        else:
            env |= {"CVSERVE_REDIS_URL": args.redis_url,
                    "CVSERVE_KEY_PREFIX": f"cvserve-soak-{os.getpid()}"}
            procs["worker"] = subprocess.Popen([*python, "worker"], env=env, stdout=logs,
                                               stderr=subprocess.STDOUT)
            procs["api"] = subprocess.Popen([*python, "api"], env=env, stdout=logs,
                                            stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            return soak(url, procs, images, video, args)
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                proc.wait(60)
            logs.close()


def soak(url: str, procs: dict[str, subprocess.Popen[bytes]], images: list[bytes],
         video: bytes, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
            print("the service did not become ready", file=sys.stderr)
            return 1
        time.sleep(1)

    client = httpx.Client(timeout=120)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 10:  # capacity: one request at a time, /detect
        client.post(f"{url}/detect", files={"file": ("s.jpg", images[n % len(images)])})
        n += 1
    capacity = n / (time.perf_counter() - t0)
    clients = max(1, round(2 * args.load))  # closed loop: two clients saturate two cores
    pause = max(0.0, clients / (capacity * args.load) - 1 / capacity)
    print(f"capacity {capacity:.1f} req/s (/detect, one client); {clients} clients, "
          f"{pause * 1000:.0f} ms between requests each: ~{args.load:.0%} load")

    lock = threading.Lock()
    minute: list[tuple[float, int | str, bool]] = []  # (latency s, status, deliberate)
    totals: Counter[str] = Counter()
    stop = threading.Event()

    def one(rng: random.Random, http: httpx.Client) -> tuple[int | str, bool]:
        pick = rng.random()
        image = images[rng.randrange(len(images))]
        if pick < 0.60:
            r = http.post(f"{url}/detect", files={"file": ("s.jpg", image)})
        elif pick < 0.75:
            r = http.post(f"{url}/segment", files={"file": ("s.jpg", image)})
        elif pick < 0.85:
            r = http.post(f"{url}/explain", params={"model": "resnet18", "method": "cam"},
                          files={"file": ("s.jpg", image)})
        elif pick < 0.95:
            r = http.post(f"{url}/classify-video", files={"file": ("v.mp4", video)})
        else:
            r = http.post(f"{url}/detect", files={"file": ("t.txt", b"not an image")})
            return r.status_code, True
        return r.status_code, False

    def worker(seed: int) -> None:
        rng, http = random.Random(seed), httpx.Client(timeout=120)
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status, deliberate = one(rng, http)
            except httpx.HTTPError as exc:
                status, deliberate = type(exc).__name__, False
            with lock:
                minute.append((time.perf_counter() - t, status, deliberate))
            time.sleep(pause)

    rss_start: dict[str, float] = {}  # after the first minute: warm-up allocations done
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    end = time.monotonic() + args.minutes * 60
    print("minute | served | errors (status: count) | p50 ms | p99 ms | RSS MiB")
    m = 0
    while time.monotonic() < end:
        time.sleep(min(60, max(0.0, end - time.monotonic())))
        m += 1
        with lock:
            batch, minute[:] = list(minute), []
        latencies = sorted(lat for lat, _, _ in batch)
        errors = Counter(str(s) for _, s, deliberate in batch if s != 200 and not deliberate)
        bad_ok = sum(1 for _, s, deliberate in batch if deliberate and s == 415)
        totals["served"] += sum(1 for _, s, _ in batch if s == 200)
        totals["deliberate 415"] += bad_ok
        totals.update({f"error {k}": v for k, v in errors.items()})
        totals["deliberate, wrong answer"] += sum(1 for _, s, d in batch if d and s != 415)
        p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0
        p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0
        rss = ", ".join(f"{name} {rss_mb(p.pid):.0f}" for name, p in procs.items())
        if m == 1:
            rss_start = {name: rss_mb(p.pid) for name, p in procs.items()}
        print(f"{m:6d} | {len(batch):6d} | {dict(errors) or '-'} | {p50:6.0f} | {p99:6.0f} | "
              f"{rss}", flush=True)
    stop.set()
    for t in threads:
        t.join(150)
    rss_end = {name: rss_mb(p.pid) for name, p in procs.items()}
    print("\ntotals:", dict(totals))
    for name in rss_start:
        growth = (rss_end[name] - rss_start[name]) / rss_start[name]
        print(f"RSS {name}: {rss_start[name]:.0f} -> {rss_end[name]:.0f} MiB ({growth:+.1%})")
    failed = sum(v for k, v in totals.items() if k.startswith("error") or k.startswith(
        "deliberate, wrong"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

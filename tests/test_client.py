"""cvserve.client and `cvserve predict` against live services over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cvserve.client import AsyncClient, Client, CvserveHTTPError
from cvserve.models.evaluate import HELD_OUT_SEED, coco_ground_truth, evaluate_eager
from cvserve.models.export import DEMO_WEIGHTS, build_eager
from cvserve.models.synthetic import make_scene
from cvserve.models.synthetic_video import make_action_video
from cvserve.models.train_video import export_demo_actions

from .conftest import REPO_ROOT, Service, free_port, pin_batching

DETECTOR = "demo-ts"


@pytest.fixture(scope="module")
def service(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`cvserve run` with the demo detector and the demo action classifier; videos longer
    than 10 s run as jobs."""
    repo = tmp_path_factory.mktemp("repo-client")
    shutil.copytree(demo_repo / DETECTOR, repo / DETECTOR)
    export_demo_actions(repo)
    pin_batching(repo / "demo-actions")
    svc = Service("run", {"CVSERVE_MODEL_REPOSITORY": str(repo),
                          "CVSERVE_AUTO_BUILD_DEFAULT": "false",
                          "CVSERVE_ASYNC_VIDEO_DURATION_S": "10"},
                  tmp_path_factory.mktemp("logs"), port=free_port()).start()
    try:
        yield svc.wait_ready(timeout=120)
    finally:
        svc.stop()


def predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvserve.app.cli", "predict", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_predict_a_folder_reports_the_file_that_failed(service: Service,
                                                       tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    (folder / "videos").mkdir(parents=True)
    (folder / "scene.jpg").write_bytes(make_scene(3).jpeg())
    (folder / "shapes.png").write_bytes(make_scene(4).png())
    # Named .jpg and .bin the wrong way round: told apart by content, not by name.
    (folder / "videos" / "actions.bin").write_bytes(make_action_video(5, 6.0).mp4())
    (folder / "broken.jpg").write_bytes(b"\x00\x01 not an image at all" * 40)
    (folder / ".hidden.jpg").write_bytes(b"skipped")
    out = tmp_path / "out"

    done = predict(str(folder), "--url", service.url, "--out", str(out), "--localize")

    assert done.returncode == 1, done.stderr
    assert "3 of 4 files done, 1 failed" in done.stderr
    refusal = httpx.post(f"{service.url}/detect",
                         files={"file": ("b", (folder / "broken.jpg").read_bytes())}).json()
    assert f"broken.jpg: 415 unsupported_media: {refusal['error']['message']}" in done.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["inputs/scene.jpg.json", "inputs/shapes.png.json",
                       "inputs/videos/actions.bin.json"]
    scene = json.loads((out / "inputs/scene.jpg.json").read_text())
    assert scene["model"] == DETECTOR and scene["detections"]
    video = json.loads((out / "inputs/videos/actions.bin.json").read_text())
    assert video["model"] == "demo-actions" and video["top"] and "segments" in video


def test_predict_ctrl_c_keeps_what_is_done(service: Service, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        (folder / f"{i:03d}.jpg").write_bytes(make_scene(100 + i, 480, 360).jpeg())
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cvserve.app.cli", "predict", str(folder),
                             "--url", service.url, "--out", str(out), "--concurrency", "2"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    while len(list(out.rglob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    kept = len(list(out.rglob("*.json")))
    assert 3 <= kept < 60
    assert "interrupted: keeping what is done" in stderr
    assert f"{kept} of 60 files done, 0 failed" in stderr
    for path in out.rglob("*.json"):  # whole answers, none cut off
        assert json.loads(path.read_text())["model"] == DETECTOR


def test_predict_without_url_runs_the_embedded_service(service: Service,
                                                       tmp_path: Path) -> None:
    image = tmp_path / "one.jpg"
    image.write_bytes(make_scene(12).jpeg())
    env = {**os.environ, "CVSERVE_MODEL_REPOSITORY": service.env["CVSERVE_MODEL_REPOSITORY"],
           "CVSERVE_AUTO_BUILD_DEFAULT": "false", "CVSERVE_MODELS": DETECTOR}
    done = subprocess.run([sys.executable, "-m", "cvserve.app.cli", "predict", str(image),
                           "--out", str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "starting the embedded service" in done.stderr
    answer = json.loads((tmp_path / "out" / "one.jpg.json").read_text())
    assert answer["model"] == DETECTOR and answer["detections"]


def test_predict_coco_results_score_the_detector_on_its_ground_truth(service: Service,
                                                                     tmp_path: Path) -> None:
    scenes = [make_scene(HELD_OUT_SEED + i) for i in range(24)]
    gt = coco_ground_truth(scenes).dataset
    folder = tmp_path / "held-out"
    folder.mkdir()
    for image, scene in zip(gt["images"], scenes, strict=True):
        image["file_name"] = f"{image['id']:04d}.png"
        (folder / image["file_name"]).write_bytes(scene.png())
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"

    done = predict(str(folder), "--url", service.url, "--out", str(out), "--format", "coco",
                   "--coco-gt", str(tmp_path / "gt.json"), "--score-threshold", "0.05",
                   "--concurrency", "8")
    assert done.returncode == 0, done.stderr

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(tmp_path / "gt.json"))
        found = truth.loadRes(str(out / "coco_results.json"))
        ev = COCOeval(truth, found, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # The reference: the demo detector's own eager model on the same scenes (PNGs carry
    # the same pixels). models/demo/README.md has 0.939 over 100 such scenes.
    reference = evaluate_eager(build_eager("tiny_fasterrcnn", str(DEMO_WEIGHTS))[0],
                               n=len(scenes))
    assert ev.stats[1] == pytest.approx(reference["map50"], abs=0.03)
    assert ev.stats[1] > 0.6


def test_client_answers_typed_objects_and_raises_the_api_error(service: Service) -> None:
    scene = make_scene(11)
    with Client(service.url) as client:
        found = client.detect(scene.jpeg(), score_threshold=0.5)
        raw = httpx.post(f"{service.url}/detect", params={"score_threshold": 0.5},
                         files={"file": ("s.jpg", scene.jpeg())}).json()
        assert found.model == DETECTOR and found.detections
        assert [d.model_dump(exclude_none=True) for d in found.detections] == raw["detections"]
        assert found.image.width == scene.image.width
        png = client.render("detect", scene.jpeg())
        assert png.startswith(b"\x89PNG")
        assert {m.name for m in client.models()} == {DETECTOR, "demo-actions"}
        with pytest.raises(CvserveHTTPError) as err:
            client.detect(b"GIF89a broken")
        assert err.value.status == 415 and err.value.code == "unsupported_media"
        with pytest.raises(CvserveHTTPError) as err:
            client.detect(scene.jpeg(), model="nope")
        assert err.value.status == 404 and "nope" in err.value.message


def test_async_client_follows_a_long_video_job_with_progress(service: Service) -> None:
    video = make_action_video(21, 14.0).mp4()  # over 10 s: a job
    seen: list[tuple[int, int | None]] = []

    async def go() -> tuple:
        async with AsyncClient(service.url, timeout=120) as client:
            answer = await client.classify_video(video, localize=True, poll_s=0.2,
                                                 progress=lambda d, t: seen.append((d, t)))
            image = await client.detect(make_scene(2).jpeg())
            return answer, image

    answer, image = asyncio.run(go())
    assert image.model == DETECTOR
    assert answer.model == "demo-actions" and answer.segments is not None
    assert answer.video.duration_s == pytest.approx(14.0, abs=0.1)
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1][0] == seen[-1][1] == answer.video.clips
    # The same video, waited for on the server (async=false), gives the same labels.
    with Client(service.url, timeout=120) as client:
        direct = client.classify_video(video, localize=True, async_=False)
    assert [c.label for c in direct.top] == [c.label for c in answer.top]


def test_client_retries_a_503_after_its_retry_after(demo_repo: Path, redis_url: str,
                                                    redis_prefix: str, tmp_path: Path,
                                                    services: list[Service]) -> None:
    """No worker yet: the api answers 503 with Retry-After; the client waits, retries,
    and succeeds once a worker has started."""
    env = {"CVSERVE_REDIS_URL": redis_url, "CVSERVE_KEY_PREFIX": redis_prefix,
           "CVSERVE_MODEL_REPOSITORY": str(demo_repo), "CVSERVE_MODELS": DETECTOR}
    api = Service("api", env, tmp_path, port=free_port()).start()
    services.append(api)
    api.wait_log("Application startup complete")
    statuses: list[int] = []
    answers: list[object] = []

    def call() -> None:
        with Client(api.url, retries=30, max_backoff_s=2) as client:
            client.http.event_hooks["response"].append(lambda r: statuses.append(r.status_code))
            answers.append(client.detect(make_scene(9).jpeg()))

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while 503 not in statuses and time.monotonic() < deadline:
        time.sleep(0.1)
    assert statuses and statuses[0] == 503
    services.append(Service("worker", env, tmp_path).start())
    caller.join(180)
    assert not caller.is_alive() and len(answers) == 1, api.log()
    assert statuses[-1] == 200 and set(statuses[:-1]) == {503}


def test_predict_with_a_wrong_url_says_so_at_once(tmp_path: Path) -> None:
    image = tmp_path / "one.jpg"
    image.write_bytes(make_scene(13).jpeg())
    t0 = time.monotonic()
    done = predict(str(image), "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "no service at" in done.stderr
    assert time.monotonic() - t0 < 30  # not five backed-off retries per file

"""POST /classify-video and GET /jobs/{id} over real HTTP, on real H.264 files made by PyAV.

The model is a small 3D CNN with fixed random weights, exported here as ONNX and as
TorchScript; the reference is that same eager module fed frames that torchvision's own
video transforms prepared from the same decoded clips.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from cvserve.models.export import _quiet_exporters
from cvserve.worker.video import VideoLimits, clip_starts, probe_video, read_clips

from .conftest import Service, free_port

CLASSES = ["abseiling", "bowling", "cartwheel", "dancing", "juggling"]
CLIP_LEN, FRAME_RATE, NUM_CLIPS = 8, 10.0, 3
RESIZE_TO, CROP = (72, 96), (64, 64)
MEAN, STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)


class Tiny3D(nn.Module):
    """conv3d -> ReLU -> global mean -> linear: [B, 3, T, H, W] -> logits [B, 5]."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, len(CLASSES))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(video)).mean(dim=(2, 3, 4)))


MODEL_TOML = f"""\
task = "video-classification"
backend = "{{backend}}"
file = "{{file}}"
weights = "random (test)"
weights_kind = "random"
inputs = ["video"]
outputs = ["logits"]

[input]
resize = "center-crop"
resize_to = {list(RESIZE_TO)}
size = {list(CROP)}
mean = {list(MEAN)}
std = {list(STD)}

[output]
decoder = "classification-logits"

[video]
clip_len = {CLIP_LEN}
frame_rate = {FRAME_RATE}
num_clips = {NUM_CLIPS}
dynamic_clip_len = {{dynamic}}

[batching]
policy = "fixed"
max_batch_size = 4
max_queue_delay_ms = 20
"""


def write_model(repo: Path, name: str, module: nn.Module, backend: str,
                dynamic: bool = True) -> None:
    folder = repo / name
    folder.mkdir(parents=True)
    example = torch.randn(2, 3, CLIP_LEN, *CROP)
    with _quiet_exporters():
        _export(module, example, folder, backend, dynamic)
    file = "model.onnx" if backend == "onnx" else "model.pt"
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "model.toml").write_text(MODEL_TOML.format(backend=backend, file=file,
                                                          dynamic=str(dynamic).lower()))


def _export(module: nn.Module, example: torch.Tensor, folder: Path, backend: str,
            dynamic: bool) -> None:
    if backend == "onnx":
        file = "model.onnx"
        axes = {"video": {0: "batch", 2: "time"} if dynamic else {0: "batch"},
                "logits": {0: "batch"}}
        torch.onnx.export(module, (example,), str(folder / file), input_names=["video"],
                          output_names=["logits"], dynamic_axes=axes, dynamo=False)
    else:
        file = "model.pt"
        torch.jit.trace(module, example).save(str(folder / file))


def encode_video(seconds: float, fps: int = 25, size: tuple[int, int] = (320, 240),
                 seed: int = 0, gop: int = 25) -> bytes:
    """A real H.264 MP4: a noise texture sliding right, a bright square bouncing."""
    width, height = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"g": str(gop)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.roll(base, 3 * i, axis=1)
            x = int((np.sin(i / 7) + 1) / 2 * (width - 40))
            frame[100:140, x:x + 40] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def eager() -> nn.Module:
    torch.manual_seed(7)
    return Tiny3D().eval()


@pytest.fixture(scope="module")
def video_repo(eager: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo-video")
    write_model(repo, "tiny3d-onnx", eager, "onnx")
    write_model(repo, "tiny3d-ts", eager, "torchscript")
    write_model(repo, "tiny3d-fixed", eager, "torchscript", dynamic=False)
    write_frame_model(repo, "tiny2d-frames", frame_eager())
    return repo


class Tiny2D(nn.Module):
    """An image classifier: conv2d -> ReLU -> global mean -> linear: [N, 3, H, W] -> [N, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, len(CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(images)).mean(dim=(2, 3)))


def frame_eager() -> nn.Module:
    torch.manual_seed(11)
    return Tiny2D().eval()


def write_frame_model(repo: Path, name: str, module: nn.Module) -> None:
    """The single-frame baseline: an image model run on every sampled frame."""
    folder = repo / name
    folder.mkdir(parents=True)
    with _quiet_exporters():
        torch.jit.trace(module, torch.randn(2, 3, *CROP)).save(str(folder / "model.pt"))
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    toml = MODEL_TOML.format(backend="torchscript", file="model.pt", dynamic="true")
    toml = toml.replace('inputs = ["video"]', 'inputs = ["images"]')
    toml = toml.replace("[video]\n", '[video]\nlayout = "frames"\n')
    (folder / "model.toml").write_text(toml)


@pytest.fixture(scope="module")
def service(video_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service("run", {"CVSERVE_MODEL_REPOSITORY": str(video_repo),
                          "CVSERVE_AUTO_BUILD_DEFAULT": "false",
                          "CVSERVE_DEFAULT_VIDEO_MODEL": "tiny3d-onnx",
                          "CVSERVE_ASYNC_VIDEO_DURATION_S": "20",
                          "CVSERVE_VIDEO_MAX_DURATION_S": "60",
                          "CVSERVE_VIDEO_UPLOAD_BYTES": str(3 * 1024 * 1024)},
                  tmp_path_factory.mktemp("logs"), port=free_port()).start()
    try:
        yield svc.wait_ready(timeout=120)
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def video() -> bytes:
    return encode_video(6.0)


def classify(svc: Service, data: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{svc.url}/classify-video", params=params, timeout=120,
                      files={"file": ("clip.mp4", data, "video/mp4")})


def eager_clip_probs(model: nn.Module, data: bytes, starts: list[float]) -> np.ndarray:
    """torchvision's VideoClassification steps (resize without antialias, centre crop,
    scale, normalize) on the clips our decoder yields -> softmax [clips, classes]."""
    clips = read_clips(data, starts, CLIP_LEN, FRAME_RATE, VideoLimits())
    out = []
    with torch.no_grad():
        for clip in clips:
            x = torch.from_numpy(clip).permute(0, 3, 1, 2)  # [T, 3, H, W] uint8
            x = TF.resize(x, list(RESIZE_TO), antialias=False)
            x = TF.center_crop(x, list(CROP))
            x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), MEAN, STD)
            out.append(model(x.permute(1, 0, 2, 3)[None]).softmax(dim=1)[0].numpy())
    return np.stack(out)


def test_frame_level_model_averages_its_frames(service: Service, video: bytes) -> None:
    r = classify(service, video, model="tiny2d-frames", clips="true", top_k=len(CLASSES))
    assert r.status_code == 200, r.text
    starts = clip_starts(probe_video(video, VideoLimits()), CLIP_LEN, FRAME_RATE,
                         num_clips=NUM_CLIPS)
    model = frame_eager()
    ref = []
    with torch.no_grad():
        for clip in read_clips(video, starts, CLIP_LEN, FRAME_RATE, VideoLimits()):
            x = torch.from_numpy(clip).permute(0, 3, 1, 2)
            x = TF.center_crop(TF.resize(x, list(RESIZE_TO), antialias=False), list(CROP))
            x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), MEAN, STD)
            ref.append(model(x).softmax(dim=1).mean(dim=0).numpy())  # frames' mean
    served = np.stack([probs_of(c["top"]) for c in r.json()["clips"]])
    assert np.abs(served - np.stack(ref)).max() <= 1e-4


def probs_of(answer_top: list[dict]) -> np.ndarray:
    probs = np.zeros(len(CLASSES))
    for entry in answer_top:
        probs[entry["class_id"]] = entry["score"]
    return probs


@pytest.mark.parametrize("model", ["tiny3d-onnx", "tiny3d-ts"])
def test_clip_scores_equal_eager_on_the_same_decoded_frames(
        service: Service, eager: nn.Module, video: bytes, model: str) -> None:
    r = classify(service, video, model=model, clips="true", top_k=len(CLASSES))
    assert r.status_code == 200, r.text
    answer = r.json()
    starts = clip_starts(probe_video(video, VideoLimits()), CLIP_LEN, FRAME_RATE,
                         num_clips=NUM_CLIPS)
    ref = eager_clip_probs(eager, video, starts)
    assert [c["start_s"] for c in answer["clips"]] == pytest.approx(starts, abs=1e-3)
    served = np.stack([probs_of(c["top"]) for c in answer["clips"]])
    assert np.abs(served - ref).max() <= 1e-4
    # The video's answer is the clips' mean ("test by averaging clips").
    assert np.abs(probs_of(answer["top"]) - ref.mean(axis=0)).max() <= 1e-4
    assert [t["class_id"] for t in answer["top"]] == list(np.argsort(-ref.mean(axis=0)))


def test_answer_describes_the_video_and_its_sampling(service: Service, video: bytes) -> None:
    answer = classify(service, video, num_clips=4, top_k=2).json()
    assert answer["model"] == "tiny3d-onnx"  # CVSERVE_DEFAULT_VIDEO_MODEL
    assert len(answer["top"]) == 2
    assert answer["video"] | {"codec": "h264"} == answer["video"]
    meta = answer["video"]
    assert (meta["width"], meta["height"], meta["fps"]) == (320, 240, 25.0)
    assert meta["duration_s"] == pytest.approx(6.0, abs=0.05)
    assert (meta["clips"], meta["clip_len"], meta["frames_sampled"]) == (4, CLIP_LEN,
                                                                         4 * CLIP_LEN)
    assert "clips" not in answer and "segments" not in answer
    assert set(answer["timing"]) >= {"queue", "preprocess", "inference", "postprocess",
                                     "total"}


def test_sampling_parameters_change_the_clips(service: Service, video: bytes) -> None:
    dense = classify(service, video, clip_stride_s=1.0, clips="true", top_k=1).json()
    starts = [c["start_s"] for c in dense["clips"]]
    assert starts == pytest.approx([0, 1, 2, 3, 4, 5][:len(starts)])
    assert len(starts) == 6  # windows of 0.8 s every second over 6 s
    stride = classify(service, video, frame_stride=5, clip_len=4, num_clips=2,
                      model="tiny3d-ts").json()
    assert stride["video"]["frame_rate"] == 5.0  # 25 fps / 5
    assert stride["video"]["frames_sampled"] == 8


def test_clips_of_concurrent_videos_batch_together(service: Service) -> None:
    videos = [encode_video(3.0, seed=s) for s in range(4)]
    alone = [classify(service, v, clips="true", top_k=5).json() for v in videos]
    before = batch_histogram(service)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda v: classify(service, v, clips="true",
                                                    top_k=5).json(), videos))
    after = batch_histogram(service)
    runs = after["count"] - before["count"]
    clips = after["sum"] - before["sum"]
    assert clips == 4 * NUM_CLIPS
    assert runs < clips  # some batches held more than one clip
    for a, b in zip(alone, together, strict=True):  # batching changes no score
        assert np.abs(probs_of(a["top"]) - probs_of(b["top"])).max() <= 1e-5


def batch_histogram(svc: Service) -> dict[str, float]:
    text = httpx.get(f"{svc.url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f'cvserve_inference_batch_size_{part}{{model="tiny3d-onnx"}}'):
                out[part] = float(line.split()[-1])
    return out


def test_fixed_clip_length_model_refuses_another(service: Service, video: bytes) -> None:
    r = classify(service, video, model="tiny3d-fixed", clip_len=4)
    assert r.status_code == 400
    assert "exactly 8 frames" in r.json()["error"]["message"]


def audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return buf.getvalue()


def png_image() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("make", "params", "status", "words"), [
    (lambda v: b"", {}, 400, "empty"),
    (lambda v: b"hello, not a video" * 10, {}, 415, "not a video"),
    (lambda v: png_image(), {}, 415, "still image"),
    (lambda v: audio_only(), {}, 415, "audio-only"),
    (lambda v: v[: len(v) // 3], {}, 415, "video"),
    (lambda v: v, {"num_clips": 2, "clip_stride_s": 1}, 400, "not both"),
    (lambda v: v, {"frame_rate": 5, "frame_stride": 2}, 400, "not both"),
    (lambda v: v, {"clip_len": 0}, 400, "clip_len"),
    (lambda v: v, {"localize": "perhaps"}, 400, "localize"),
    (lambda v: v, {"model": "nope"}, 404, "nope"),
    (lambda v: encode_video(61.0, size=(64, 48)), {}, 413, "max_duration_s"),
    (lambda v: v + bytes(3 * 1024 * 1024), {}, 413, "CVSERVE_VIDEO_UPLOAD_BYTES"),
])
def test_bad_video_requests_are_json_errors(service: Service, video: bytes, make, params,
                                            status: int, words: str) -> None:
    r = classify(service, make(video), **params)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert classify(service, video, num_clips=1).status_code == 200  # still serving


def test_async_job_reports_progress_then_the_result(service: Service, video: bytes) -> None:
    sync = classify(service, video, clip_stride_s=0.4, top_k=5).json()
    r = classify(service, video, clip_stride_s=0.4, top_k=5, **{"async": "true"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["status_url"] == f"/jobs/{job['job_id']}"
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = httpx.get(f"{service.url}{job['status_url']}", timeout=10).json()
        seen.append(status["status"])
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert status["status"] == "done", status
    assert set(seen) <= {"queued", "running", "done"}
    total = sync["video"]["clips"]
    assert status["progress"] == {"done": total, "total": total}
    assert status["result"]["model"] == "tiny3d-onnx"
    assert np.abs(probs_of(status["result"]["top"]) - probs_of(sync["top"])).max() <= 1e-5


def test_long_video_runs_as_a_job_without_asking(service: Service) -> None:
    long_video = encode_video(25.0, size=(64, 48), gop=250)  # over the 20 s set above
    r = classify(service, long_video)
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{service.url}/jobs/{job_id}").json())["status"] not in (
            "done", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status["status"] == "done"
    assert status["result"]["video"]["duration_s"] == pytest.approx(25.0, abs=0.05)
    # async=false waits for the answer instead.
    assert classify(service, long_video, **{"async": "false"}).status_code == 200


def test_unknown_job_is_404(service: Service) -> None:
    r = httpx.get(f"{service.url}/jobs/0123456789abcdef", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "job_not_found"


class Slow3D(nn.Module):
    """Two 32-channel 3D convolutions: ~1 GFLOP per clip, slow enough to kill mid-job."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv3d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, len(CLASSES))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(video))))
        return self.fc(x.mean(dim=(2, 3, 4)))


def test_async_job_survives_a_worker_killed_and_an_api_restarted(
        redis_url: str, redis_prefix: str, tmp_path: Path, services: list[Service],
        video: bytes) -> None:
    """The job is queued work in Redis, not state in a process: a second worker reclaims
    it from the killed one, and a new api process answers GET /jobs/{id}."""
    torch.manual_seed(3)
    write_model(tmp_path / "repo", "slow3d", Slow3D().eval(), "torchscript")
    env = {"CVSERVE_REDIS_URL": redis_url, "CVSERVE_KEY_PREFIX": redis_prefix,
           "CVSERVE_MODEL_REPOSITORY": str(tmp_path / "repo"),
           "CVSERVE_AUTO_BUILD_DEFAULT": "false", "CVSERVE_VISIBILITY_TIMEOUT_MS": "2000",
           "CVSERVE_INTRA_OP_THREADS": "1", "CVSERVE_DECODE_THREADS": "1"}

    def start(command: str) -> Service:
        port = free_port() if command == "api" else None
        svc = Service(command, env, tmp_path, port=port).start()
        services.append(svc)
        return svc

    api, worker = start("api"), start("worker")
    api.wait_ready(timeout=120)
    r = classify(api, video, clip_stride_s=0.1, **{"async": "true"})
    assert r.status_code == 202, r.text
    job_url = r.json()["status_url"]

    def status(svc: Service) -> dict:
        return httpx.get(f"{svc.url}{job_url}", timeout=10).json()

    deadline = time.monotonic() + 60
    while status(api)["progress"]["done"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    running = status(api)
    assert running["status"] == "running" and running["progress"]["done"] < running[
        "progress"]["total"], running
    worker.kill()
    api.kill()
    api2 = start("api")
    start("worker")
    api2.wait_ready(timeout=120)
    deadline = time.monotonic() + 120
    while (final := status(api2))["status"] not in ("done", "failed") \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert final["status"] == "done", final
    clips = final["result"]["video"]["clips"]
    assert clips == 53  # windows of 0.8 s every 0.1 s over 6 s
    assert final["progress"] == {"done": clips, "total": clips}

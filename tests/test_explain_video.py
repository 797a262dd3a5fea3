"""/explain on a video model: Grad-CAM over T x H x W, a heatmap per sampled frame, through
real HTTP, against pytorch-grad-cam (which takes 5-D inputs) on the eager model.

The model is the demo action classifier (a small C3D, shipped weights), the videos are
rendered by models/synthetic_video.py and encoded with H.264 by PyAV.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cvserve.app.settings import Settings
from cvserve.models.synthetic_video import SIZE, make_action_clip
from cvserve.models.train_video import export_demo_actions, load_actions
from cvserve.worker.repository import load_config
from cvserve.worker.video import VideoLimits, read_clips
from cvserve.worker.video_classification import clip_input, frame_maps

from .conftest import Service, embedded_service

MODEL = "demo-actions"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explain-video-repo")
    export_demo_actions(root)
    return root


@pytest.fixture(scope="module")
def service(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with embedded_service({"CVSERVE_MODEL_REPOSITORY": str(repo)},
                          tmp_path_factory.mktemp("explain-video-logs")) as svc:
        yield svc


def layer_resolution_gradcam(net: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor,
                             target: int, plus: bool = False) -> np.ndarray:
    """pytorch-grad-cam's map at the layer's own t x h x w: its resize to the input is
    skipped (that upsampling is spline interpolation, ours is per-frame linear, and what
    is compared is the Grad-CAM, not the resampling)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class AtLayer(GradCAMPlusPlus if plus else GradCAM):  # type: ignore[misc, valid-type]
        def get_target_width_height(self, input_tensor: torch.Tensor) -> None:
            return None

    with AtLayer(model=net, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]


def served_clip(repo: Path, video: bytes, start_s: float) -> torch.Tensor:
    """The clip the worker sampled, as its input. # [1, 3, T, H, W]"""
    cfg = load_config(repo / MODEL)
    assert cfg.video is not None and cfg.video.frame_rate is not None
    clip = next(read_clips(video, [start_s], cfg.video.clip_len, cfg.video.frame_rate,
                           VideoLimits.from_settings(Settings())))
    return torch.from_numpy(clip_input(clip, cfg))[None]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_a_heatmap_per_frame_equals_pytorch_grad_cam(service: Service, repo: Path,
                                                     method: str) -> None:
    video = make_action_clip("move_right", 5, duration_s=3.0).mp4()
    r = httpx.post(f"{service.url}/explain", params={"method": method},
                   files={"file": ("a.mp4", video, "video/mp4")}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["layer"] == "features"
    [clip] = body["clips"]
    frames = clip["frames"]
    assert len(frames) == body["video"]["clip_len"] == 16
    times = [f["time_s"] for f in frames]
    assert times == sorted(times) and times[0] == clip["start_s"]
    assert times[1] - times[0] == pytest.approx(1 / body["video"]["frame_rate"], abs=1e-3)
    served = np.array([f["heatmap"]["data"] for f in frames])  # [16, h, w]
    assert 0 <= served.min() and served.max() <= 1
    net, _ = load_actions()
    target = clip["target"]["class_id"]
    x = served_clip(repo, video, clip["start_s"])
    with torch.no_grad():
        probs = net(x).softmax(dim=1)[0]
    assert target == int(probs.argmax()) == body["top"][0]["class_id"]
    assert clip["target"]["score"] == pytest.approx(float(probs[target]), abs=1e-3)
    reference = frame_maps(layer_resolution_gradcam(net, net.features, x, target,
                                                    plus=method == "gradcam++"), 16)
    assert served.shape == reference.shape
    assert np.corrcoef(served.ravel(), reference.ravel())[0, 1] >= 0.99
    np.testing.assert_allclose(served, reference, atol=2e-3)


def test_frame_maps_interpolates_between_the_layers_time_steps() -> None:
    maps = np.zeros((4, 1, 1), dtype=np.float32)
    maps[1] = 1.0  # the layer's second step covers frames 4-7 of 16
    frames = frame_maps(maps, 16)[:, 0, 0]
    assert frames.argmax() in (5, 6) and frames[5] == frames[6] == pytest.approx(0.875)
    assert frames[0] == 0 and frames[-1] == 0


def test_several_clips_and_a_png_strip(service: Service) -> None:
    video = make_action_clip("grow", 6, duration_s=4.0).mp4()
    r = httpx.post(f"{service.url}/explain", params={"num_clips": 2, "target": "grow"},
                   files={"file": ("a.mp4", video, "video/mp4")}, timeout=120)
    assert r.status_code == 200, r.text
    clips = r.json()["clips"]
    assert len(clips) == 2 and clips[0]["start_s"] < clips[1]["start_s"]
    assert {c["target"]["label"] for c in clips} == {"grow"}
    r = httpx.post(f"{service.url}/explain", params={"num_clips": 2, "format": "png"},
                   files={"file": ("a.mp4", video, "video/mp4")}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    strip = Image.open(io.BytesIO(r.content))
    width, height = SIZE
    thumb_w = round(width * 96 / height)
    assert strip.size == (16 * thumb_w, 2 * 96)  # a row of 16 frames per clip


@pytest.mark.parametrize(("params", "says"), [
    ({"method": "saliency"}, "gradcam or gradcam++"),
    ({"layer": "features.99"}, "no layer"),
    ({"target": "jump"}, "neither a class id"),
])
def test_bad_video_requests(service: Service, params: dict, says: str) -> None:
    video = make_action_clip("blink", 7, duration_s=2.0).mp4()
    r = httpx.post(f"{service.url}/explain", params=params,
                   files={"file": ("a.mp4", video, "video/mp4")}, timeout=60)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


def test_an_image_to_a_video_model_is_refused(service: Service) -> None:
    from cvserve.models.synthetic import make_scene

    r = httpx.post(f"{service.url}/explain", params={"model": MODEL},
                   files={"file": make_scene(1, 160, 120).jpeg()}, timeout=60)
    assert r.status_code == 400 and "send a video" in r.json()["error"]["message"]

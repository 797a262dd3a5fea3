"""Video classifier export: torchvision's Kinetics-400 models and the single-frame baseline
export, check and load as model.toml declares; the artifact gives the eager torchvision
model's probabilities on frames decoded from a real MP4, preprocessed by torchvision's own
transforms; and the worker's preprocessing of those frames is that same tensor."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cvserve.models.export import ExportError
from cvserve.models.synthetic import make_scene
from cvserve.models.video_export import (
    CLIPS,
    FRAME_CLASSIFIERS,
    PROB_TOL,
    VIDEO_CLASSIFIERS,
    build_frame_classifier,
    build_video_classifier,
    compare,
    export_frame_classifier,
    export_video_classifier,
    input_spec,
)
from cvserve.worker.preprocess import preprocess
from cvserve.worker.repository import InputSpec, load_config
from cvserve.worker.video import VideoLimits, clip_starts, probe_video, read_clips

from .conftest import REPO_ROOT

ARCH = "r3d_18"
FPS, SECONDS = 30, 2
# Worker preprocessing vs torchvision's transforms: the same float operations (bilinear
# interpolate, round to uint8, crop, / 255, mean / std), so equal up to float rounding
# (measured: 7e-7); one uint8 level would be 1 / 255 / std ~ 0.018.
PREPROCESS_TOL = 1e-5


def panning_mp4() -> bytes:
    """A generated scene panning 4 px a frame, 320x240 at 30 fps, mpeg4 in MP4."""
    rgb = np.array(make_scene(7, 320, 240).image)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.codec_context.time_base = Fraction(1, FPS)
        stream.codec_context.qmax = 4
        for i in range(FPS * SECONDS):
            frame = av.VideoFrame.from_ndarray(np.roll(rgb, 4 * i, axis=1), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


@pytest.fixture(scope="module")
def decoded() -> list[torch.Tensor]:
    """Two 16-frame clips at 15 fps, decoded by the worker's reader. # each [T, 3, H, W] uint8"""
    data, limits = panning_mp4(), VideoLimits()
    recipe = CLIPS[ARCH]
    starts = clip_starts(probe_video(data, limits), recipe.clip_len, recipe.frame_rate,
                         num_clips=2)
    return [torch.from_numpy(clip).permute(0, 3, 1, 2).contiguous()
            for clip in read_clips(data, starts, recipe.clip_len, recipe.frame_rate, limits)]


@pytest.fixture(scope="module")
def r3d() -> nn.Module:
    """The eager model export_video_classifier(ARCH, weights="random") exports."""
    return build_video_classifier(ARCH, "random")[0]


def transforms(arch: str) -> nn.Module:
    return torchvision.models.get_model_weights(arch).DEFAULT.transforms()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_r3d_18_artifact_gives_eager_probabilities_on_decoded_video(
        fmt: str, tmp_path: Path, decoded: list[torch.Tensor], r3d: nn.Module) -> None:
    path = export_video_classifier(ARCH, tmp_path, weights="random", fmt=fmt)
    cfg = load_config(path)
    assert (cfg.name, cfg.task, cfg.backend) == (ARCH, "video-classification", fmt)
    assert (cfg.inputs, cfg.outputs, cfg.weights_kind) == (["video"], ["logits"], "random")
    assert (cfg.output.decoder, cfg.output.activation) == ("classification-logits", "softmax")
    assert cfg.input == InputSpec(**input_spec(ARCH))
    assert (cfg.input.resize, cfg.input.resize_to, cfg.input.size, cfg.input.antialias) == (
        "center-crop", (128, 171), (112, 112), False)
    video = cfg.video
    assert video is not None
    assert (video.layout, video.clip_len, video.frame_rate, video.num_clips,
            video.dynamic_clip_len) == ("NCTHW", 16, 15.0, 5, True)
    labels = cfg.label_names()
    assert len(labels) == 400 and labels[0] == "abseiling"

    # Batch and T are free: traced at 1 clip of 8 frames, run at 2 x 16 and 3 x 12.
    clips = torch.stack([transforms(ARCH)(clip) for clip in decoded])  # [2, 3, 16, 112, 112]
    for batch in (clips, torch.cat([clips, clips[:1]])[:, :, 2:14]):
        prob, _ = compare(r3d, cfg.artifact(), batch)
        assert prob <= PROB_TOL, tuple(batch.shape)


def test_random_weights_give_spread_probabilities(r3d: nn.Module,
                                                  decoded: list[torch.Tensor]) -> None:
    # A probability check means something only if the probabilities are not all ~1/400.
    with torch.inference_mode():
        probs = r3d(torch.stack([transforms(ARCH)(clip) for clip in decoded])).softmax(1)
    assert float(probs.max()) > 0.05


@pytest.mark.parametrize("arch", [*VIDEO_CLASSIFIERS, *FRAME_CLASSIFIERS])
def test_worker_preprocessing_equals_torchvision_transforms(arch: str,
                                                            decoded: list[torch.Tensor]
                                                            ) -> None:
    spec = InputSpec(**input_spec(arch))
    landscape = decoded[0][:4]
    for frames in (landscape, landscape.transpose(2, 3).contiguous()):  # 320x240, 240x320
        ref = transforms(arch)(frames)
        if arch in VIDEO_CLASSIFIERS:
            ref = ref.transpose(0, 1)  # [3, T, h, w] -> [T, 3, h, w]
        got = torch.stack([torch.from_numpy(preprocess(frame, spec)[0]) for frame in frames])
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= PREPROCESS_TOL


@pytest.mark.parametrize("arch", VIDEO_CLASSIFIERS)
def test_clip_sampling_is_the_weights_evaluation_recipe(arch: str) -> None:
    meta = torchvision.models.get_model_weights(arch).DEFAULT.meta
    recipe = CLIPS[arch]
    assert f"frame_rate={recipe.frame_rate:g}`" in meta["_docs"]
    assert f"clip_len={recipe.clip_len}`" in meta["_docs"]
    assert recipe.min_clip_len == meta.get("min_temporal_size", 1)
    assert recipe.clip_len >= recipe.min_clip_len


def test_kinetics_label_file_is_torchvision_order() -> None:
    names = (REPO_ROOT / "models" / "labels" / "kinetics400.txt").read_text().splitlines()
    for arch in VIDEO_CLASSIFIERS:
        assert list(torchvision.models.get_model_weights(arch).DEFAULT.meta["categories"]) \
            == names


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_frame_classifier_exports_as_a_video_model(tmp_path: Path,
                                                   decoded: list[torch.Tensor]) -> None:
    path = export_frame_classifier("resnet18", tmp_path, weights="random")
    cfg = load_config(path)
    assert (cfg.name, cfg.task, cfg.backend) == ("resnet18-frames", "video-classification",
                                                 "onnx")
    assert (cfg.inputs, cfg.outputs) == (["images"], ["logits"])
    assert cfg.video is not None
    assert (cfg.video.layout, cfg.video.clip_len, cfg.video.frame_rate) == ("frames", 8, 1.0)
    assert (cfg.input.resize, cfg.input.resize_shorter, cfg.input.size,
            cfg.input.antialias) == ("center-crop", 256, (224, 224), True)
    assert cfg.input.mean == (0.485, 0.456, 0.406)
    labels = cfg.label_names()
    assert len(labels) == 1000 and labels[0] == "tench"

    model, _, _ = build_frame_classifier("resnet18", "random")
    images = transforms("resnet18")(decoded[0][::2])  # 8 frames, [8, 3, 224, 224]
    prob, _ = compare(model, cfg.artifact(), images)
    assert prob <= PROB_TOL


def test_unknown_architectures_name_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="r3d_18.*swin3d_t"):
        export_video_classifier("x3d_m", tmp_path, weights="random")
    with pytest.raises(ExportError, match="resnet18.*mobilenet_v3_small"):
        export_frame_classifier("vit_b_16", tmp_path, weights="random")
    assert not list(tmp_path.iterdir())


def test_pretrained_weights_offline_say_what_to_do(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # No cached weights and an unreachable proxy: torchvision's download fails.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(ExportError, match="--weights random"):
        export_video_classifier("mc3_18", tmp_path / "repo", weights="default")
    assert not (tmp_path / "repo").exists()


def test_export_command_dispatches_video_and_frame_models(tmp_path: Path) -> None:
    env = {**os.environ, "CVSERVE_MODEL_REPOSITORY": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "cvserve.app.cli", "models", "export",
                        "mobilenet_v3_small-frames", "--weights", "random", "--no-check"],
                       env=env,
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = load_config(tmp_path / "mobilenet_v3_small-frames")
    assert (cfg.task, cfg.backend, cfg.architecture) == ("video-classification", "onnx",
                                                         "mobilenet_v3_small")
    offline = {**env, "TORCH_HOME": str(tmp_path / "hub"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "cvserve.app.cli", "models", "export", ARCH],
                       env=offline, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--weights random" in r.stderr
    assert not (tmp_path / ARCH).exists()

"""The demo image classifier: the shipped weights recognise held-out shapes, their logits are
the fc of the pooled feature map (so CAM is exact), the exported TorchScript is the eager
model, and the pointing game scores a heatmap as Zhang et al. 2016 define it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cvserve.models.classifier_demo import (
    DEMO_CLASSIFIER,
    EXPLAIN_LAYER,
    HELD_OUT_SEED,
    DemoClassifier,
    check_batch,
    evaluate,
    export_demo_classifier,
    load_demo_classifier,
    pointing_game,
)
from cvserve.worker.repository import load_config

BOX = (40.0, 60.0, 80.0, 100.0)  # x1, y1, x2, y2 in a 200x100 (width x height) image


@pytest.fixture(scope="module")
def model() -> DemoClassifier:
    if not DEMO_CLASSIFIER.is_file():
        pytest.skip(f"no shipped weights at {DEMO_CLASSIFIER}; train them with "
                    "`python -m cvserve.models.classifier_demo`")
    return load_demo_classifier()


def peak_at(x: float, y: float, size: tuple[int, int] = (200, 100)) -> np.ndarray:
    """A heatmap at image resolution, zero but for one pixel whose centre is (x, y)."""
    heatmap = np.zeros((size[1], size[0]), dtype=np.float32)
    heatmap[int(y), int(x)] = 1.0
    return heatmap


def test_shipped_weights_classify_held_out_scenes(model: DemoClassifier) -> None:
    result = evaluate(model, n=100, seed=HELD_OUT_SEED)
    assert result["accuracy"] >= 0.9, result


def test_logits_are_the_fc_of_the_pooled_features(model: DemoClassifier) -> None:
    images = check_batch(2)
    with torch.inference_mode():
        logits, features = model.forward_with_features(images)
        pooled = model.fc(features.mean((2, 3)))
    assert features.shape == (2, 128, 8, 8)
    torch.testing.assert_close(pooled, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(images), logits, atol=0, rtol=0)


def test_explain_layer_is_the_feature_map_the_head_pools(model: DemoClassifier) -> None:
    seen: list[torch.Tensor] = []
    layer = dict(model.named_modules())[EXPLAIN_LAYER]
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.inference_mode():
            _, features = model.forward_with_features(check_batch(1))
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], features, atol=0, rtol=0)


def test_exported_torchscript_equals_eager(model: DemoClassifier, tmp_path: Path) -> None:
    folder = export_demo_classifier(tmp_path / "repo")
    cfg = load_config(folder)
    assert (cfg.task, cfg.backend, cfg.file, cfg.weights_kind) == (
        "classification", "torchscript", "model.pt", "demo")
    assert cfg.inputs == ["images"] and cfg.outputs == ["logits", "features"]
    assert cfg.output.decoder == "classification-logits" and cfg.output.features == "features"
    assert (cfg.input.resize, cfg.input.size) == ("stretch", (128, 128))
    assert cfg.label_names() == ["circle", "square", "triangle", "star"]
    # Batch 3: neither the batch of 1 an export might bake in nor the verified batch.
    images = torch.cat([check_batch(2), check_batch(1).flip(-1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's upstream deprecation
        module = torch.jit.load(str(folder / "model.pt"), map_location="cpu")
    with torch.inference_mode():
        logits, features = module(images)
        ref_logits, ref_features = model.forward_with_features(images)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(features, ref_features, atol=1e-4, rtol=0)


def test_pointing_game_hits_a_maximum_inside_the_box() -> None:
    assert pointing_game(peak_at(60, 80), BOX, (200, 100))
    assert pointing_game(peak_at(40, 60), BOX, (200, 100), tolerance_px=0)


def test_pointing_game_misses_a_maximum_outside_the_box() -> None:
    assert not pointing_game(peak_at(150, 80), BOX, (200, 100))
    assert not pointing_game(peak_at(60, 20), BOX, (200, 100))


def test_pointing_game_tolerance_enlarges_the_box_by_that_many_pixels() -> None:
    # 10 px right of the box (pixel centre 90.5): within 15 px, not within 5 px.
    assert pointing_game(peak_at(90, 80), BOX, (200, 100), tolerance_px=15)
    assert not pointing_game(peak_at(90, 80), BOX, (200, 100), tolerance_px=5)
    # 20 px left of it: beyond the default 15 px.
    assert not pointing_game(peak_at(20, 80), BOX, (200, 100))


def test_pointing_game_maps_a_coarse_heatmap_onto_the_image() -> None:
    # 4x2 cells over a 200x100 image: cell (row 1, col 1) is centred at (75, 75), in the
    # box; cell (row 0, col 3) at (175, 25), far from it.
    heatmap = np.zeros((2, 4), dtype=np.float32)
    heatmap[1, 1] = 1.0
    assert pointing_game(heatmap, BOX, (200, 100), tolerance_px=0)
    heatmap[0, 3] = 2.0
    assert not pointing_game(heatmap, BOX, (200, 100))

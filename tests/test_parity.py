"""Served detections equal the eager torchvision model's on the same images, for the ONNX
and the TorchScript artifact of the same weights."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cvserve.models.export import build_eager
from cvserve.models.synthetic import make_scene

from .conftest import Service, iou

SIZES = [(480, 360), (300, 420), (640, 427), (256, 256), (512, 300), (333, 500)]


def eager_reference(model: torch.nn.Module, data: bytes) -> list[dict]:
    """torchvision's model on the image as a user would feed it (PIL -> float [0,1])."""
    rgb = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    with torch.no_grad():
        out = model([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255])[0]
    return [{"class_id": int(label), "score": float(score),
             "box": dict(zip(("x1", "y1", "x2", "y2"), box.tolist(), strict=True))}
            for box, score, label in zip(out["boxes"], out["scores"], out["labels"],
                                         strict=True)]


@pytest.mark.parametrize("model_name", ["demo-ts", "demo-onnx"])
def test_served_detections_equal_eager_torchvision(demo_service: Service, model_name: str,
                                                   demo_checkpoint: Path) -> None:
    model, _ = build_eager("tiny_fasterrcnn", str(demo_checkpoint))
    compared = 0
    for i, size in enumerate(SIZES):
        data = make_scene(300 + i, *size).jpeg()
        r = httpx.post(f"{demo_service.url}/detect", files={"file": ("x.jpg", data)},
                       params={"model": model_name, "score_threshold": 0.05,
                               "max_detections": 1000}, timeout=120)
        assert r.status_code == 200, r.text
        served = r.json()["detections"]
        expected = eager_reference(model, data)
        assert len(served) == len(expected), (served, expected)
        for e in expected:
            assert any(s["class_id"] == e["class_id"] and iou(s["box"], e["box"]) >= 0.99
                       and abs(s["score"] - e["score"]) <= 1e-3 for s in served), e
        compared += len(expected)
    assert compared >= 10, "enough detections to make the comparison mean something"

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


def test_exif_rotated_photo_gives_boxes_on_the_upright_image(demo_service: Service) -> None:
    """A phone photo: pixels stored sideways, EXIF orientation 6. Boxes and the reported
    size are those of the upright image a viewer shows (the scene's ground truth)."""
    scene = make_scene(11, 480, 320)
    upright = Image.open(io.BytesIO(scene.jpeg()))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored = upright turned 90 degrees counter-clockwise
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=95,
                                                       exif=exif.tobytes())
    r = httpx.post(f"{demo_service.url}/detect", files={"file": ("phone.jpg", buf.getvalue())},
                   params={"model": "demo-ts", "score_threshold": 0.5}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 480, "height": 320}
    found = [max((iou(d["box"], dict(zip(("x1", "y1", "x2", "y2"), o.box, strict=True)))
                  for d in body["detections"]), default=0.0) for o in scene.objects]
    assert sum(f >= 0.5 for f in found) >= len(scene.objects) // 2 + 1, (found, body)

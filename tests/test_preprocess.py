"""Declared preprocessing equals the reference implementations of each convention, and its
geometry maps model coordinates back onto the image the user sent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from cvserve.worker.preprocess import preprocess
from cvserve.worker.repository import InputSpec


def photo(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image (a resize of noise), so interpolation differences stay small."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (3, h // 8 + 2, w // 8 + 2), dtype=np.uint8))
    return TF.resize(small, [h, w], antialias=False)


def spec(**kw: object) -> InputSpec:
    return InputSpec(scale=1.0, mean=(0, 0, 0), std=(1, 1, 1), **kw)


def test_letterbox_top_left_matches_opencv_inter_linear() -> None:
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is a test dependency")
    image = photo(426, 640)
    x, geo = preprocess(image, spec(resize="letterbox", size=(416, 416), pad_value=114,
                                    color="BGR"))
    bgr = image.permute(1, 2, 0).numpy()[..., ::-1]
    r = min(416 / 426, 416 / 640)
    resized = cv2.resize(np.ascontiguousarray(bgr), (int(640 * r), int(426 * r)),
                         interpolation=cv2.INTER_LINEAR)
    expected = np.full((416, 416, 3), 114, np.float32)
    expected[:resized.shape[0], :resized.shape[1]] = resized
    assert x.shape == (3, 416, 416)
    # OpenCV's own resize: equal to the level, not within one as a float resize would be.
    np.testing.assert_array_equal(x, expected.transpose(2, 0, 1))
    assert geo.scale_xy == (r, r) and geo.offset_xy == (0.0, 0.0)


def test_center_crop_matches_torchvision_resize_and_crop() -> None:
    image = photo(480, 360)
    x, geo = preprocess(image, spec(resize="center-crop", size=(224, 224), resize_shorter=256,
                                    antialias=True))
    ref = TF.center_crop(TF.resize(image, [256], antialias=True), [224, 224]).float()
    assert np.abs(x - ref.numpy()).max() <= 1
    # 360x480 -> 256x341; the crop starts at ((256 - 224) / 2, round((341 - 224) / 2)).
    assert geo.offset_xy == (-16.0, -58.0)


@pytest.mark.parametrize("anchor", ["top-left", "center"])
def test_letterbox_boxes_map_back_to_the_original(anchor: str) -> None:
    """A white square drawn on the image is found where the geometry says it lands."""
    image = torch.zeros(3, 300, 500, dtype=torch.uint8)
    image[:, 100:200, 50:150] = 255  # the square: x 50..150, y 100..200
    x, geo = preprocess(image, spec(resize="letterbox", size=(256, 320), anchor=anchor,
                                    pad_value=0))
    ys, xs = np.nonzero(x[0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = geo.boxes_to_original(found)[0]
    assert np.allclose(back, [50, 100, 150, 200], atol=1.5), back
    if anchor == "center":  # 500x300 at ratio 0.64 -> 320x192, centred vertically
        assert geo.offset_xy == (0.0, 32.0)


def test_stretch_nhwc_rgb_scaling() -> None:
    image = photo(100, 200)
    x, geo = preprocess(image, InputSpec(layout="NHWC", scale=1 / 127.5, mean=(1, 1, 1),
                                         std=(1, 1, 1), resize="stretch", size=(50, 50),
                                         antialias=True))
    ref = TF.resize(image, [50, 50], antialias=True).float().permute(1, 2, 0) / 127.5 - 1
    assert x.shape == (50, 50, 3) and x.dtype == np.float32
    assert np.abs(x - ref.numpy()).max() <= 1 / 127.5 + 1e-6
    assert geo.scale_xy == (0.25, 0.5)


def test_map_to_original_undoes_letterbox_padding() -> None:
    image = torch.zeros(3, 300, 500, dtype=torch.uint8)
    _, geo = preprocess(image, spec(resize="letterbox", size=(256, 256), anchor="center"))
    label_map = torch.zeros(256, 256, dtype=torch.int64)
    # The left half of the letterboxed image's content area is class 1.
    left, top = int(geo.offset_xy[0]), int(geo.offset_xy[1])
    label_map[:, :128] = 1
    back = geo.map_to_original(label_map)
    assert back.shape == (300, 500) and left == 0 and top > 0
    assert back[:, :249].eq(1).all() and back[:, 251:].eq(0).all()

"""worker/masks.py against its references: pycocotools, torchvision's paste, Pillow."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from cvserve.worker.masks import (
    COCO_SKELETON,
    class_rles,
    encode_rle,
    label_map_png,
    mask_polygons,
    palette,
    paste_masks,
    render_instances,
    render_semantic,
)

# The PASCAL VOC colour map as published (VOCdevkit's labelcolormap): background,
# aeroplane, bicycle, bird, boat, bottle, bus, car, cat, ..., person (15), tvmonitor (20).
VOC = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
       5: (128, 0, 128), 6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0),
       15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}


def coco_decode(rle: dict) -> np.ndarray:
    """pycocotools' decoding. # [H, W] uint8"""
    # pycocotools 2.0.11's decode asks numpy 2 for an array copy=False in a way it deprecates.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def decode(rle: dict) -> np.ndarray:
    """An RLE as sent over JSON, decoded by pycocotools. # [H, W] uint8"""
    coded = json.loads(json.dumps(rle))
    return coco_decode({"size": coded["size"], "counts": coded["counts"].encode()})


def disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("mask", [
    np.random.default_rng(0).random((37, 51)) > 0.5,
    np.zeros((20, 30), dtype=bool),
    np.ones((20, 30), dtype=bool),
    (np.random.default_rng(1).random((16, 9)) > 0.7).astype(np.uint8) * 255,
], ids=["random", "empty", "full", "uint8-255"])
def test_rle_round_trips_through_pycocotools(mask: np.ndarray) -> None:
    rle = encode_rle(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode(rle), mask != 0)


@pytest.mark.parametrize("mask", [
    disc(64, 80, 30, 40, 15),
    np.pad(np.ones((30, 40), dtype=bool), ((10, 24), (5, 35))),
    disc(64, 80, 16, 16, 10) | disc(64, 80, 45, 60, 12),
], ids=["disc", "rectangle", "two-discs"])
def test_polygons_rasterize_back_to_the_mask(mask: np.ndarray) -> None:
    polygons = mask_polygons(mask)
    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    h, w = mask.shape
    back = coco_decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))
    assert iou(back.astype(bool), mask) >= 0.9


def test_polygons_of_empty_or_degenerate_masks() -> None:
    assert mask_polygons(np.zeros((10, 10), dtype=bool)) == []
    dot_and_line = np.zeros((10, 10), dtype=bool)
    dot_and_line[2, 2] = True
    dot_and_line[6, 1:8] = True
    assert mask_polygons(dot_and_line) == []


def paste_case() -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Random 28x28 probabilities, boxes inside, partly outside and tiny."""
    g = torch.Generator().manual_seed(0)
    h, w = 50, 70
    masks = torch.rand(12, 28, 28, generator=g)
    corners = torch.rand(8, 2, generator=g) * torch.tensor([w, h])
    sizes = torch.rand(8, 2, generator=g) * 30 + 1
    boxes = torch.cat([corners, corners + sizes], dim=1)
    boxes = torch.cat([boxes, torch.tensor([[-10.0, -5.0, 20.0, 30.0],   # partly outside
                                            [60.0, 40.0, 90.0, 65.0],    # partly outside
                                            [10.0, 10.0, 10.4, 10.3],    # under a pixel
                                            [30.0, 20.0, 31.0, 22.0]])])  # tiny
    return masks, boxes, (h, w)


def test_pasted_masks_equal_torchvision_paste() -> None:
    masks, boxes, hw = paste_case()
    expected = paste_masks_in_image(masks[:, None], boxes, hw)[:, 0] > 0.5
    pasted = paste_masks(masks, boxes, hw)
    assert isinstance(pasted, Iterator)
    pasted = list(pasted)
    assert len(pasted) == len(masks)
    for got, want in zip(pasted, expected, strict=True):
        assert got.dtype == np.bool_ and got.shape == hw
        np.testing.assert_array_equal(got, want.numpy())
    from_numpy = list(paste_masks(masks.numpy(), boxes.numpy(), hw, threshold=0.5))
    np.testing.assert_array_equal(np.stack(from_numpy), expected.numpy())


def test_paste_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"boxes \(3, 4\)"):
        paste_masks(torch.rand(2, 28, 28), torch.zeros(3, 4), (10, 10))


def test_palette_is_the_voc_colour_map() -> None:
    colours = palette(300)
    assert colours.shape == (300, 3) and colours.dtype == np.uint8
    for index, rgb in VOC.items():
        assert tuple(colours[index]) == rgb
    assert len(np.unique(colours, axis=0)) == 300
    np.testing.assert_array_equal(palette(5), colours[:5])


def read_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_label_map_png_is_a_voc_palette_png_of_the_indices() -> None:
    label_map = np.random.default_rng(0).integers(0, 21, (30, 40))
    image = read_png(label_map_png(label_map, 21))
    assert image.format == "PNG" and image.mode == "P"
    np.testing.assert_array_equal(np.array(image), label_map)
    colours = np.array(image.getpalette()).reshape(-1, 3)
    assert tuple(colours[15]) == VOC[15] and tuple(colours[20]) == VOC[20]


def test_label_map_png_is_16_bit_beyond_256_classes() -> None:
    label_map = np.random.default_rng(0).integers(0, 1000, (30, 40))
    image = read_png(label_map_png(label_map, 1000))
    assert image.mode == "I;16"
    np.testing.assert_array_equal(np.array(image), label_map)


@pytest.mark.parametrize("bad", [-1, 21])
def test_label_map_png_rejects_indices_outside_the_classes(bad: int) -> None:
    label_map = np.zeros((4, 4), dtype=np.int64)
    label_map[1, 2] = bad
    with pytest.raises(ValueError, match=r"\[0, 21\)"):
        label_map_png(label_map, 21)


def test_class_rles_decode_to_each_class_mask() -> None:
    label_map = np.random.default_rng(0).choice([0, 3, 7, 12], size=(33, 47))
    rles = class_rles(label_map)
    assert list(rles) == [0, 3, 7, 12]
    for c, rle in rles.items():
        np.testing.assert_array_equal(decode(rle), label_map == c)


def grey(h: int, w: int) -> torch.Tensor:
    return torch.full((3, h, w), 100, dtype=torch.uint8)


def test_render_semantic_blends_classes_and_keeps_background() -> None:
    image, label_map = grey(120, 160), np.zeros((120, 160), dtype=np.int64)
    label_map[80:110, 110:150] = 15
    out = render_semantic(image, label_map, [f"c{i}" for i in range(21)])
    assert out.dtype == torch.uint8 and out.shape == image.shape
    blended = (np.array([100, 100, 100]) + np.array(VOC[15])) / 2
    np.testing.assert_allclose(out[:, 95, 130].numpy(), blended, atol=1)
    assert torch.equal(out[:, 100:, :60], image[:, 100:, :60])  # far from class and legend
    assert (out[:, 2, 2] < 100).all()  # the legend's dark box, top left


def test_render_semantic_keeps_size_when_the_legend_overflows() -> None:
    label_map = np.arange(20 * 24).reshape(20, 24) % 15  # 14 classes besides background
    out = render_semantic(grey(20, 24), label_map, ["only-one-name"])
    assert out.dtype == torch.uint8 and out.shape == (3, 20, 24)


def test_render_instances_draws_masks_keypoints_and_boxes() -> None:
    h, w = 64, 80
    image = grey(h, w)
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    keypoints = torch.tensor([[[60.0, 50.0, 1.0], [70.0, 10.0, 0.0]]])  # visible, hidden
    masks = (m for m in [disc(h, w, 25, 25, 10)])
    out = render_instances(image, boxes, ["cat 0.90"], masks, keypoints, [(0, 1)])
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert tuple(out[:, 25, 25].tolist()) == ((100 + 128) // 2, 100 // 2, 100 // 2)
    assert tuple(out[:, 10, 25].tolist()) == VOC[1]  # the box's top edge
    assert tuple(out[:, 50, 60].tolist()) == VOC[1]  # the visible keypoint
    assert torch.equal(out[:, 5:25, 65:], image[:, 5:25, 65:])  # the hidden one, no line
    assert torch.equal(out[:, 50:, :5], image[:, 50:, :5])


def test_render_instances_draws_pasted_masks_beyond_one_chunk() -> None:
    masks, boxes, (h, w) = paste_case()  # 12 instances: more than one chunk of masks
    probabilities = torch.ones_like(masks)
    out = render_instances(grey(h, w), boxes, [""] * len(boxes),
                           paste_masks(probabilities, boxes, (h, w)))
    assert out.shape == (3, h, w)
    pasted = paste_masks_in_image(probabilities[:, None], boxes, (h, w))[:, 0] > 0.5
    outside = ~pasted.any(0)
    for box in boxes.round().int().tolist():  # and not near a box's edges
        outside[max(box[1] - 3, 0):box[3] + 3, max(box[0] - 3, 0):box[2] + 3] = False
    assert (out[:, pasted.any(0)] != 100).any(0).all()
    assert torch.equal(out[:, outside], grey(h, w)[:, outside])


def test_overlapping_masks_show_the_later_instance_not_black() -> None:
    h, w = 40, 40
    masks = [disc(h, w, 20, 15, 10), disc(h, w, 20, 25, 10)]
    boxes = torch.tensor([[5.0, 10.0, 25.0, 30.0], [15.0, 10.0, 35.0, 30.0]])
    out = render_instances(grey(h, w), boxes, ["a", "b"], iter(masks))
    assert tuple(out[:, 27, 20].tolist()) == (100 // 2, (100 + 128) // 2, 100 // 2)


def test_render_instances_without_instances_is_the_image() -> None:
    image = grey(10, 12)
    assert torch.equal(render_instances(image, torch.zeros(0, 4), [], iter([])), image)


def test_render_instances_rejects_a_mask_count_other_than_the_boxes() -> None:
    boxes = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    two = [np.zeros((10, 12), dtype=bool)] * 2
    with pytest.raises(ValueError, match="expected 1 masks"):
        render_instances(grey(10, 12), boxes, ["x"], iter(two))


def test_coco_skeleton_joins_all_17_keypoints() -> None:
    assert len(COCO_SKELETON) == 19 and len(set(COCO_SKELETON)) == 19
    reached, frontier = {0}, [0]
    while frontier:
        k = frontier.pop()
        for a, b in COCO_SKELETON:
            for nxt in ({a, b} - {k} if k in (a, b) else set()) - reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert reached == set(range(17))

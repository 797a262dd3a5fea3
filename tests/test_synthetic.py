"""The synthetic world is deterministic and its ground truth is exact."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cvserve.models.synthetic import CLASSES, make_scene, write_dataset


def test_same_seed_gives_the_same_bytes() -> None:
    assert make_scene(42).png() == make_scene(42).png()
    assert make_scene(42).png() != make_scene(43).png()


@pytest.mark.parametrize("seed", range(20))
def test_visible_mask_pixels_have_the_objects_colour_and_boxes_are_mask_extents(
        seed: int) -> None:
    scene = make_scene(seed)
    pixels = np.array(scene.image)
    assert scene.objects, "every scene keeps at least one mostly visible object"
    for obj in scene.objects:
        assert obj.label in CLASSES and obj.class_id == CLASSES.index(obj.label) + 1
        assert (pixels[obj.mask] == obj.colour).all()
        ys, xs = np.nonzero(obj.mask)
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_requested_size_is_respected() -> None:
    assert make_scene(1, 333, 222).image.size == (333, 222)


# pycocotools 2.0.11's decode trips numpy 2's __array__ deprecation; nothing of ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_dataset_is_coco_instances_with_masks_and_label_maps(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, 3, seed=5)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    for image_id, seed in zip((1, 2, 3), (5, 6, 7), strict=True):
        scene = make_scene(seed)
        (info,) = coco.loadImgs(image_id)
        with Image.open(tmp_path / "images" / info["file_name"]) as photo:
            assert photo.size == (info["width"], info["height"]) == scene.image.size
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(scene.objects)
        for ann, obj in zip(anns, scene.objects, strict=True):
            assert ann["category_id"] == obj.class_id
            assert (coco.annToMask(ann) == obj.mask).all()
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == obj.box
        with Image.open(tmp_path / "labels" / f"{seed:06d}.png") as png:
            labels = np.array(png)
        expected = np.zeros(labels.shape, dtype=np.uint8)
        for obj in scene.objects:
            expected[obj.mask] = obj.class_id
        assert (labels == expected).all()

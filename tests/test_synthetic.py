"""The synthetic world is deterministic and its ground truth is exact."""

from __future__ import annotations

import numpy as np
import pytest

from cvserve.models.synthetic import CLASSES, make_scene


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

"""A synthetic world of shapes, deterministic from a seed, with exact ground truth.

Images of circles, squares, triangles and stars (random colours, sizes, rotations, partial
overlaps) on noisy, textured backgrounds at varied sizes. Ground truth per object: class,
box and instance mask (what remains visible after later objects are drawn over it).

    python -m cvserve.models.synthetic --out shapes --n 100 --seed 1000000

writes a dataset in COCO's layout: images/*.jpg, instances.json (boxes and RLE masks)
and labels/*.png (semantic label maps: 0 background, 1-4 the classes).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CLASSES = ("circle", "square", "triangle", "star")


@dataclass
class SceneObject:
    label: str
    class_id: int  # 1-based: 0 is background, as in torchvision's detectors
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 of the visible mask, pixels
    mask: np.ndarray  # [H, W] bool, visible pixels
    colour: tuple[int, int, int]  # RGB fill


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]

    def jpeg(self, quality: int = 92) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()

    def label_map(self) -> np.ndarray:
        """[H, W] uint8: each pixel's visible object's class id, 0 for background."""
        labels = np.zeros((self.image.height, self.image.width), dtype=np.uint8)
        for obj in self.objects:
            labels[obj.mask] = obj.class_id
        return labels


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(math.cos(angle + k * math.pi / 2), math.sin(angle + k * math.pi / 2))
                   for k in range(4)]
        return [(cx + r * x, cy + r * y) for x, y in corners]
    if kind == "triangle":
        return [(cx + r * math.cos(angle + k * 2 * math.pi / 3),
                 cy + r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    # star: 5 points, inner radius 0.45 r
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        a = angle + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Noise over a smooth colour gradient with faint stripes: texture, not a flat fill."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = (x / max(width - 1, 1) * rng.uniform(0, 1) + y / max(height - 1, 1) * rng.uniform(0, 1))
    t = (t / max(t.max(), 1e-6))[..., None]
    base = c0 * (1 - t) + c1 * t
    period = rng.uniform(6, 30)
    stripes = 12 * np.sin((x * rng.uniform(-1, 1) + y) / period)[..., None]
    noise = rng.normal(0, 10, (height, width, 3))
    return np.clip(base + stripes + noise, 0, 255).astype(np.uint8)


def make_scene(seed: int, width: int | None = None, height: int | None = None,
               max_objects: int = 4, min_visible: float = 0.5) -> Scene:
    """One scene. Objects hidden below `min_visible` of their area are dropped from the GT."""
    rng = np.random.default_rng(seed)
    width = width or int(rng.integers(240, 640))
    height = height or int(rng.integers(240, 640))
    canvas = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(canvas)
    owner = np.full((height, width), -1, dtype=np.int32)  # which object is on top per pixel
    drawn: list[tuple[str, np.ndarray, tuple[int, int, int]]] = []
    for i in range(int(rng.integers(1, max_objects + 1))):
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        r = float(rng.uniform(0.08, 0.22) * min(width, height))
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        layer = Image.new("L", (width, height), 0)
        ldraw = ImageDraw.Draw(layer)
        if kind == "circle":
            bbox = (cx - r, cy - r, cx + r, cy + r)
            draw.ellipse(bbox, fill=colour)
            ldraw.ellipse(bbox, fill=255)
        else:
            pts = _polygon(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            draw.polygon(pts, fill=colour)
            ldraw.polygon(pts, fill=255)
        full = np.asarray(layer) > 0
        owner[full] = i
        drawn.append((kind, full, colour))
    objects = []
    for i, (kind, full, colour) in enumerate(drawn):
        visible = owner == i
        if visible.sum() < min_visible * max(full.sum(), 1):
            continue
        ys, xs = np.nonzero(visible)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        objects.append(SceneObject(kind, CLASSES.index(kind) + 1, box, visible, colour))
    return Scene(canvas, objects)


def coco_instances(scenes: list[Scene], file_names: list[str] | None = None
                   ) -> dict[str, Any]:
    """COCO instances JSON of `scenes` (image ids from 1): boxes xywh, masks as compressed
    RLE, area the mask's pixel count. Objects hidden below make_scene's min_visible are
    not in it, as they are not in `scene.objects`."""
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        image = {"id": image_id, "width": scene.image.width, "height": scene.image.height}
        if file_names is not None:
            image["file_name"] = file_names[image_id - 1]
        images.append(image)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj.class_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "segmentation": {"size": rle["size"],
                                                 "counts": rle["counts"].decode()},
                                "area": float(obj.mask.sum()), "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}


def write_dataset(out: Path, n: int, seed: int = 0) -> Path:
    """Scenes seed .. seed + n - 1 as out/images/NNNNNN.jpg (quality 92, as Scene.jpeg),
    out/labels/NNNNNN.png and out/instances.json; returns the JSON's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    scenes, names = [], []
    for s in range(seed, seed + n):
        scene = make_scene(s)
        name = f"{s:06d}.jpg"
        (out / "images" / name).write_bytes(scene.jpeg())
        Image.fromarray(scene.label_map()).save(out / "labels" / f"{s:06d}.png")
        scenes.append(scene)
        names.append(name)
    path = out / "instances.json"
    path.write_text(json.dumps(coco_instances(scenes, names)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="write a synthetic shapes dataset in "
                                                 "COCO's layout")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1_000_000,
                        help="first scene's seed (the demo models trained below 1,000,000)")
    args = parser.parse_args()
    print(f"wrote {write_dataset(args.out, args.n, args.seed)}")


if __name__ == "__main__":
    main()

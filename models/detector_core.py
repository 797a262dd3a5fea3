"""The exportable core of a torchvision detector: everything but resizing and normalizing.

Input:  images      [B, 3, H, W] float, normalized, resized and padded (worker/detection.py)
        image_sizes [B, 2] int64, each image's (h, w) inside the padding
Output: boxes  [B, K, 4] xyxy in resized-image pixels   scores [B, K] (padding: -1)
        labels [B, K] int64                             counts [B] int64 (valid rows)

K is the model's detections_per_img. Keeping resize outside the graph is what lets images
of different sizes share a batch; padded outputs give every backend one output shape.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD


class DetectorCore(nn.Module):
    """Shared by the three families: image sizes in, padded outputs out."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def sizes(self, image_sizes: Tensor) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for i in range(image_sizes.shape[0]):
            out.append((int(image_sizes[i, 0]), int(image_sizes[i, 1])))
        return out

    def forward(self, images: Tensor, image_sizes: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.pad(images, self.detect(images, self.sizes(image_sizes)))

    def detect(self, images: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def pad(self, images: Tensor, detections: list[dict[str, Tensor]]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Concatenating padding (rather than writing into a preallocated slice) keeps the
        # traced ONNX graph valid when an image has no detections at all.
        boxes, scores, labels = [], [], []
        for det in detections:
            fill = self.k - det["boxes"].shape[0]
            boxes.append(torch.cat([det["boxes"], images.new_zeros((fill, 4))]))
            scores.append(torch.cat([det["scores"], images.new_full((fill,), -1.0)]))
            labels.append(torch.cat([det["labels"], det["labels"].new_zeros((fill,))]))
        padded_scores = torch.stack(scores)
        counts = (padded_scores >= 0).sum(dim=1)  # real scores are probabilities
        return torch.stack(boxes), padded_scores, torch.stack(labels), counts


class RCNNCore(DetectorCore):
    """Faster R-CNN: backbone -> RPN proposals -> RoI heads (per-class NMS)."""

    def detect(self, images: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        features = self.model.backbone(images)
        if isinstance(features, torch.Tensor):  # a single-map backbone, as GeneralizedRCNN
            features = OrderedDict([("0", features)])
        proposals, _ = self.model.rpn(ImageList(images, sizes), features)
        detections, _ = self.model.roi_heads(features, proposals, sizes)
        return detections


class SSDCore(DetectorCore):
    def detect(self, images: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        features = list(self.model.backbone(images).values())
        head_outputs = self.model.head(features)
        anchors = self.model.anchor_generator(ImageList(images, sizes), features)
        return self.model.postprocess_detections(head_outputs, anchors, sizes)


class DenseCore(DetectorCore):
    """RetinaNet (A anchors per location) and FCOS (one point per location)."""

    def __init__(self, model: nn.Module, k: int, anchors_per_location: int) -> None:
        super().__init__(model, k)
        self.anchors_per_location = anchors_per_location

    def detect(self, images: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        features = list(self.model.backbone(images).values())
        head_outputs = self.model.head(features)
        anchors = self.model.anchor_generator(ImageList(images, sizes), features)
        per_level = [x.size(2) * x.size(3) * self.anchors_per_location for x in features]
        split_outputs: dict[str, list[Tensor]] = {}
        for key in head_outputs:
            split_outputs[key] = list(head_outputs[key].split(per_level, dim=1))
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return self.model.postprocess_detections(split_outputs, split_anchors, sizes)


def _tensor_sizes(self: DetectorCore, image_sizes: Tensor) -> list:
    """For ONNX tracing: sizes stay tensors, so they remain graph inputs (int() would
    freeze the sizes seen at export time into the graph as constants)."""
    return [(image_sizes[i, 0], image_sizes[i, 1]) for i in range(image_sizes.shape[0])]


def detector_core(model: nn.Module, traced: bool = False) -> DetectorCore:
    """The core for a torchvision detector; `traced=True` for ONNX export by tracing."""
    if isinstance(model, FasterRCNN):
        core: DetectorCore = RCNNCore(model, model.roi_heads.detections_per_img)
    elif isinstance(model, SSD):
        core = SSDCore(model, model.detections_per_img)
    elif isinstance(model, RetinaNet):
        a = model.anchor_generator.num_anchors_per_location()[0]
        core = DenseCore(model, model.detections_per_img, a)
    elif isinstance(model, FCOS):
        core = DenseCore(model, model.detections_per_img, 1)
    else:
        raise TypeError(f"no detector core for {type(model).__name__}; expected a "
                        "torchvision FasterRCNN, RetinaNet, FCOS or SSD")
    if traced:
        core.sizes = _tensor_sizes.__get__(core)  # type: ignore[method-assign]
    return core.eval()

"""The exportable core of a torchvision detector: everything but resizing and normalizing.

Input:  images      [B, 3, H, W] float, normalized, resized and padded (worker/detection.py)
        image_sizes [B, 2] int64, each image's (h, w) inside the padding
Output: boxes  [B, K, 4] xyxy in resized-image pixels   scores [B, K] (padding: -1)
        labels [B, K] int64                             counts [B] int64 (valid rows)
  Mask R-CNN, then:     masks [B, K, M, M] float, each detection's mask probabilities
                        over its box, before pasting into the image (M = 28; padding: 0)
  Keypoint R-CNN, then: keypoints [B, K, P, 3] (x, y, visibility) in resized-image
                        pixels, keypoint_scores [B, K, P] (P keypoints; padding: 0)

K is the model's detections_per_img. Keeping resize outside the graph is what lets images
of different sizes share a batch; padded outputs give every backend one output shape.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD


class DetectorCore(nn.Module):
    """Shared by the three families: image sizes in, padded outputs out."""

    OUTPUTS: tuple[str, ...] = ("boxes", "scores", "labels", "counts")  # forward's, in order

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
        return self.pad(self.detect(images, self.sizes(image_sizes)))

    def detect(self, images: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def pad(self, detections: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        padded_scores = self.stack(detections, "scores", -1.0)
        counts = (padded_scores >= 0).sum(dim=1)  # real scores are probabilities
        return (self.stack(detections, "boxes", 0.0), padded_scores,
                self.stack(detections, "labels", 0.0), counts)

    def stack(self, detections: list[dict[str, Tensor]], key: str, fill: float) -> Tensor:
        """# per image [N, ...] -> [B, K, ...], rows N..K filled with `fill`.
        Concatenating padding (rather than writing into a preallocated slice) keeps the
        traced ONNX graph valid when an image has no detections at all."""
        rows = []
        for det in detections:
            x = det[key]
            shape = [self.k - x.shape[0]]
            for d in range(1, x.dim()):
                shape.append(x.shape[d])
            rows.append(torch.cat([x, x.new_full(shape, fill)]))
        return torch.stack(rows)


class RCNNCore(DetectorCore):
    """Faster R-CNN: backbone -> RPN proposals -> RoI heads (per-class NMS)."""

    def detect(self, images: Tensor, sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        features = self.model.backbone(images)
        if isinstance(features, torch.Tensor):  # a single-map backbone, as GeneralizedRCNN
            features = OrderedDict([("0", features)])
        proposals, _ = self.model.rpn(ImageList(images, sizes), features)
        detections, _ = self.model.roi_heads(features, proposals, sizes)
        return detections


class MaskRCNNCore(RCNNCore):
    """Mask R-CNN: Faster R-CNN plus each detection's mask probabilities, unpasted."""

    OUTPUTS = (*DetectorCore.OUTPUTS, "masks")

    def forward(self, images: Tensor, image_sizes: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        detections = self.detect(images, self.sizes(image_sizes))
        for det in detections:
            det["masks"] = det["masks"][:, 0]  # [N, 1, M, M]: the predicted class's mask
        boxes, scores, labels, counts = self.pad(detections)
        return boxes, scores, labels, counts, self.stack(detections, "masks", 0.0)


class KeypointRCNNCore(RCNNCore):
    """Keypoint R-CNN: Faster R-CNN plus P keypoints per detection."""

    OUTPUTS = (*DetectorCore.OUTPUTS, "keypoints", "keypoint_scores")

    def forward(self, images: Tensor, image_sizes: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        detections = self.detect(images, self.sizes(image_sizes))
        boxes, scores, labels, counts = self.pad(detections)
        return (boxes, scores, labels, counts, self.stack(detections, "keypoints", 0.0),
                self.stack(detections, "keypoints_scores", 0.0))


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
    if isinstance(model, MaskRCNN):
        core: DetectorCore = MaskRCNNCore(model, model.roi_heads.detections_per_img)
    elif isinstance(model, KeypointRCNN):
        core = KeypointRCNNCore(model, model.roi_heads.detections_per_img)
    elif isinstance(model, FasterRCNN):
        core = RCNNCore(model, model.roi_heads.detections_per_img)
    elif isinstance(model, SSD):
        core = SSDCore(model, model.detections_per_img)
    elif isinstance(model, RetinaNet):
        a = model.anchor_generator.num_anchors_per_location()[0]
        core = DenseCore(model, model.detections_per_img, a)
    elif isinstance(model, FCOS):
        core = DenseCore(model, model.detections_per_img, 1)
    else:
        raise TypeError(f"no detector core for {type(model).__name__}; expected a "
                        "torchvision FasterRCNN (MaskRCNN, KeypointRCNN), RetinaNet, FCOS or SSD")
    if traced:
        core.sizes = _tensor_sizes.__get__(core)  # type: ignore[method-assign]
    return core.eval()

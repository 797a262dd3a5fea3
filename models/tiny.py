"""A small Faster R-CNN (the demo detector) and Mask R-CNN (the demo instance segmenter)
built from torchvision's detection parts.

torchvision's smallest detector (MobileNetV3 + FPN) has ~19M parameters, mostly in its
1024-wide box head: 75 MB and ~3 s per training step on 2 CPU cores. This one keeps the
same classes (AnchorGenerator, RPN, MultiScaleRoIAlign, TwoMLPHead) with a 5-stage CNN
backbone and a 128-wide head: ~1M parameters, so it trains in minutes and ships in git.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True))


class TinyBackbone(nn.Sequential):
    """Stride 16, 96 channels: enough for shapes of 20-150 px at 320 px input."""

    out_channels = 96

    def __init__(self) -> None:
        super().__init__(_stage(3, 24), _stage(24, 48), _stage(48, 64), _stage(64, 96))


def _parts(weights: object, weights_backbone: object, kwargs: dict[str, object]
           ) -> dict[str, object]:
    """What the tiny detectors share: backbone, anchors, box RoI pooling and head, and the
    sizes they were trained at."""
    if weights is not None or weights_backbone is not None:
        raise ValueError("the tiny detectors have no published weights; train them with "
                         "`cvserve models train-demo` / `train-demo-masks`")
    defaults = {"min_size": 320, "max_size": 512, "rpn_pre_nms_top_n_test": 300,
                "rpn_post_nms_top_n_test": 100, "rpn_batch_size_per_image": 128,
                "box_batch_size_per_image": 128}
    defaults.update(kwargs)
    return {"backbone": TinyBackbone(), "num_classes": None,
            "rpn_anchor_generator": AnchorGenerator(sizes=((24, 48, 96, 160),),
                                                    aspect_ratios=((0.5, 1.0, 2.0),)),
            "box_roi_pool": MultiScaleRoIAlign(featmap_names=["0"], output_size=7,
                                               sampling_ratio=2),
            "box_head": TwoMLPHead(TinyBackbone.out_channels * 7 * 7, 128), **defaults}


def tiny_fasterrcnn(num_classes: int = 5, weights: None = None, weights_backbone: None = None,
                    **kwargs: object) -> FasterRCNN:
    """Same signature as torchvision's builders (weights must be None: none are published)."""
    return FasterRCNN(box_predictor=FastRCNNPredictor(128, num_classes),
                      **_parts(weights, weights_backbone, kwargs))


def tiny_maskrcnn(num_classes: int = 5, weights: None = None, weights_backbone: None = None,
                  **kwargs: object) -> MaskRCNN:
    """tiny_fasterrcnn's parts (same parameter names, so the demo detector's weights load
    into them) plus Mask R-CNN's mask branch, narrowed: 14x14 RoIAlign, two 64-wide 3x3
    convolutions, a transposed convolution to 28x28 masks per class."""
    return MaskRCNN(box_predictor=FastRCNNPredictor(128, num_classes),
                    mask_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=14,
                                                     sampling_ratio=2),
                    mask_head=MaskRCNNHeads(TinyBackbone.out_channels, [64, 64], 1),
                    mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
                    **_parts(weights, weights_backbone, kwargs))

"""A small C3D (Tran et al. 2015, "Learning Spatiotemporal Features with 3D Convolutional
Networks") for the demo action classifier.

C3D's shape, scaled down: 3x3x3 convolutions throughout; pool1 pools space only (1x2x2) so
early layers keep the motion, the later pools (2x2x2) halve time too; two convolutions per
block from conv3 on. C3D's widths 64-128-256-512 become 16-32-64-128, conv5 and the
4096-wide fc6/fc7 are dropped, and BatchNorm follows each convolution (C3D has none; it
trains in minutes on a CPU with it). Before conv1, each frame's difference to the next
is stacked onto its RGB (TSN's "RGB difference", Wang et al. 2016): a still background
cancels out, so motion is visible to the first layer and the network learns it within the
few hundred steps a CPU affords (plain RGB input stayed near chance that long). The last
feature map is averaged over time and space
(adaptive), so any clip length T >= 1 and input size give [B, num_classes].
About 0.85M parameters (847,623 for 7 classes), 3.4 MB of float32 weights.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (16, 32, 64, 128)  # conv1, conv2, conv3a/b, conv4a/b output channels


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True)]


class C3D(nn.Module):
    """# video [B, 3, T, H, W] normalized RGB -> logits [B, num_classes]"""

    def __init__(self, num_classes: int, widths: tuple[int, int, int, int] = WIDTHS,
                 dropout: float = 0.3) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths
        # ceil_mode: a pool over an odd or length-1 axis keeps its last element, so short
        # clips (T < 4) still reach the head.
        self.features = nn.Sequential(
            *_conv(6, c1), nn.MaxPool3d((1, 2, 2), ceil_mode=True),  # conv1, pool1
            *_conv(c1, c2), nn.MaxPool3d(2, ceil_mode=True),  # conv2, pool2
            *_conv(c2, c3), *_conv(c3, c3), nn.MaxPool3d(2, ceil_mode=True),  # conv3a/b, pool3
            *_conv(c3, c4), *_conv(c4, c4),  # conv4a/b
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c4, num_classes))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # Each frame's successor; the last frame is its own (difference 0), so any T >= 1.
        following = torch.cat([video[:, :, 1:], video[:, :, -1:]], dim=2)
        return self.head(self.pool(self.features(torch.cat([video, following - video], dim=1))))

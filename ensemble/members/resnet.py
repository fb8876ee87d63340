"""ResNet with torchvision's `BasicBlock` (He et al.), CIFAR-style stem for small inputs.

Same blocks, stages and classifier as `torchvision.models.resnet18/34`, with the usual adaptation to
8x8 / 32x32 images: the 7x7 stride-2 first conv becomes a 3x3 stride-1 conv and the max-pool is
dropped (otherwise an 8x8 digit is 2x2 after the stem). Stage widths are `width * (1, 2, 4, 8)`
(torchvision: width 64), stride 2 at the start of stages 2-4, a 1x1 conv + BN shortcut where the
shape changes, global average pooling and a classifier with bias. Works for any input size and any
number of input channels. Staged (`stem`, `stages`, `head`) so exits can attach after stages.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from core.errors import SuperweightsError

from ..registry import register_family
from .staged import StagedMember

# Blocks per stage, as in torchvision (BasicBlock depths only).
LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNet(StagedMember):
    """`forward(x) -> (B, C)` logits; `stages[i]` output has `stage_channels[i]` channels."""

    def __init__(self, depth: int, width: int = 64, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if depth not in LAYERS:
            raise SuperweightsError(
                f"invalid ResNet depth {depth}: valid depths are {', '.join(map(str, LAYERS))} (BasicBlock)"
            )
        if width < 1:
            raise SuperweightsError(f"invalid ResNet width {width}: must be >= 1 (torchvision uses 64)")
        widths = [width * 2**s for s in range(4)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages, cin = [], width
        for s, (cout, n) in enumerate(zip(widths, LAYERS[depth])):
            stride = 1 if s == 0 else 2
            # torchvision's ResNet._make_layer: shortcut conv only where the shape changes.
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
            blocks = [BasicBlock(cin, cout, stride, down)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.stage_channels = widths
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes))


def _resnet(in_channels: int, num_classes: int, depth: int, width: int = 64) -> ResNet:
    return ResNet(depth, width, in_channels, num_classes)


# "resnet-18" is torchvision's width (64); "resnet-18-16" is a thin variant (widths 16..128).
register_family("resnet-{depth}", _resnet, examples=["resnet-18", "resnet-34"])
register_family("resnet-{depth}-{width}", _resnet, examples=["resnet-18-16"])

"""MobileNetV2 (Sandler et al.), torchvision's own modules with a CIFAR-style stem.

Built from `torchvision.models.MobileNetV2` (inverted residual blocks, width multiplier, ReLU6,
dropout 0.2 + linear classifier); the only change is the first conv: stride 1 instead of 2 and any
number of input channels, the usual adaptation to 8x8 / 32x32 images. Four stride-2 blocks remain,
so an 8x8 input reaches 1x1 (never 0x0: a stride-2 3x3 conv with padding 1 maps 1x1 to 1x1) and
global average pooling makes any input size work. Depthwise 3x3 convs are slots too (kind
"dwconv3x3", weight (C, 1, 3, 3)). Staged (`stem`, `stages`, `head`) so exits can attach after stages.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2 as TorchvisionMobileNetV2
from torchvision.ops.misc import Conv2dNormActivation

from core.errors import SuperweightsError

from ..registry import register_family, register_model
from .staged import StagedMember

# Stage boundaries in torchvision's `features` (default inverted-residual setting): features[0] is the
# stem; each later stage starts at a stride-2 block; the last stage ends with the 1x1 conv to 1280.
STAGE_STARTS = (1, 4, 7, 14, 19)


class MobileNetV2(StagedMember):
    """`forward(x) -> (B, C)` logits; `stages[i]` output has `stage_channels[i]` channels."""

    def __init__(self, width_mult: float = 1.0, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        if not width_mult > 0:
            raise SuperweightsError(f"invalid MobileNetV2 width multiplier {width_mult}: must be > 0")
        tv = TorchvisionMobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout)
        features = list(tv.features)
        first = features[0][0]
        self.stem = Conv2dNormActivation(
            in_channels, first.out_channels, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6
        )
        nn.init.kaiming_normal_(self.stem[0].weight, mode="fan_out")  # torchvision's init for convs
        self.stages = nn.ModuleList(
            nn.Sequential(*features[a:b]) for a, b in zip(STAGE_STARTS[:-1], STAGE_STARTS[1:])
        )
        self.stage_channels = [stage[-1].out_channels for stage in self.stages]
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), tv.classifier)


@register_model(name="mobilenetv2")
def mobilenetv2(in_channels: int, num_classes: int) -> MobileNetV2:
    return MobileNetV2(1.0, in_channels, num_classes)


def _mobilenetv2_width(in_channels: int, num_classes: int, width_x100: int) -> MobileNetV2:
    if width_x100 < 1:
        raise SuperweightsError(
            f"invalid MobileNetV2 width {width_x100}: the width multiplier in percent must be >= 1 (e.g. 35, 50, 100, 140)"
        )
    return MobileNetV2(width_x100 / 100, in_channels, num_classes)


# "mobilenetv2-50" = width multiplier 0.5 (channels rounded to multiples of 8, as in torchvision).
register_family("mobilenetv2-{width_x100}", _mobilenetv2_width, examples=["mobilenetv2-50"])

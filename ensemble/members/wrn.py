"""Pre-activation WideResNet (Zagoruyko & Komodakis), as in the papers' code.

CIFAR style: 3x3 stem with 16 channels, three stages of (depth-4)/6 basic blocks with widths
16k, 32k, 64k, stride 2 between stages, a 1x1 shortcut conv only where the shape changes, BN, and a
classifier with bias. Convs have no bias. Works for any input size (global average pooling) and any
number of input channels. Staged (`stem`, `stages`, `head`) so exits can attach after stages.
"""

from __future__ import annotations

from torch import Tensor, nn

from core.errors import SuperweightsError

from ..registry import register_family
from .staged import StagedMember


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (cin != cout or stride != 1) else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        y = self.conv2(self.relu(self.bn2(self.conv1(o))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(StagedMember):
    """`forward(x) -> (B, C)` logits; `stages[i]` output has `stage_channels[i]` channels."""

    def __init__(self, depth: int, widen: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise SuperweightsError(
                f"invalid WideResNet depth {depth}: valid depths are 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...)"
            )
        if widen < 1:
            raise SuperweightsError(f"invalid WideResNet widen factor {widen}: must be >= 1")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        for s in range(3):
            blocks = [PreActBlock(widths[s] if i == 0 else widths[s + 1], widths[s + 1], (1 if s == 0 else 2) if i == 0 else 1) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.stage_channels = widths[1:]
        self.head = nn.Sequential(
            nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[3], num_classes)
        )


def _wrn(in_channels: int, num_classes: int, depth: int, widen: int) -> WideResNet:
    return WideResNet(depth, widen, in_channels, num_classes)


register_family(
    "wrn-{depth}-{widen}",
    _wrn,
    examples=["wrn-10-2", "wrn-10-4", "wrn-16-2", "wrn-16-4", "wrn-16-8", "wrn-22-4", "wrn-28-4", "wrn-28-7", "wrn-28-10", "wrn-40-4"],
)

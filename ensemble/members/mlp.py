"""A Linear-only member: multilayer perceptron on a fixed 8x8 grid of the image.

`mlp-{width}-{depth}`: `depth` hidden layers of `width` units (each a stage: Linear + ReLU), then a
linear classifier. The stem has no weights: adaptive average pooling to 8x8 then Flatten, so the
input size is fixed whatever the image size (an 8x8 digit passes unchanged, a 32x32 CIFAR image is
averaged over 4x4 patches) and the first layer has `in_channels * 64` inputs. Every slot is kind
"linear", so the MLP shares SuperWeights with the classifiers of the conv members.
"""

from __future__ import annotations

from torch import nn

from core.errors import SuperweightsError

from ..registry import register_family
from .staged import StagedMember

GRID = 8  # the stem pools any image to GRID x GRID


class MLP(StagedMember):
    """`forward(x) -> (B, C)` logits; `stages[i]` output has `stage_channels[i]` features."""

    def __init__(self, width: int, depth: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if width < 1 or depth < 1:
            raise SuperweightsError(
                f"invalid MLP mlp-{width}-{depth}: width (units per hidden layer) and depth (hidden layers) must be >= 1"
            )
        self.stem = nn.Sequential(nn.AdaptiveAvgPool2d(GRID), nn.Flatten())
        dims = [in_channels * GRID * GRID] + [width] * depth
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU(inplace=True)) for a, b in zip(dims[:-1], dims[1:])
        )
        self.stage_channels = dims[1:]
        self.head = nn.Linear(width, num_classes)


def _mlp(in_channels: int, num_classes: int, width: int, depth: int) -> MLP:
    return MLP(width, depth, in_channels, num_classes)


register_family("mlp-{width}-{depth}", _mlp, examples=["mlp-256-2", "mlp-512-3"])

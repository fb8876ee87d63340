"""The `full` baseline (no bank: every member's own weights, He-initialised) for its entry in
`ensemble.methods.METHODS`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .bank_method import Counts
from .config import Config
from .model import StackedEnsemble


@torch.no_grad()
def he_init_(module: nn.Module) -> None:
    """The `full` baseline's init: He (fan_in, ReLU) normal for conv/linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight[0].numel()))
            if m.bias is not None:
                m.bias.zero_()


def full_build(config, info, members, names, plan: None) -> StackedEnsemble:
    for m in members:
        he_init_(m)
    return StackedEnsemble(members, names, info.mean, info.std, exit_weights=config.ensemble.exit_weights)


def full_summary(config: Config, slots, plan: None, c: Counts) -> dict:
    return {"budget": c.slot_weights, "bank_params": 0, "coefficient_params": 0, "private_params": c.private,
            "total_params": c.full, "full_ensemble_params": c.full, "members": c.rows, "groups": []}

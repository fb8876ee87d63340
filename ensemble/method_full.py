"""The `full` baseline (no bank: every member's own weights, at the reference init) for its entry in
`ensemble.methods.METHODS`."""

from __future__ import annotations

import math

import torch
from torch import nn

from core.plan_types import init_std

from .bank_method import Counts
from .config import Config
from .model import StackedEnsemble


@torch.no_grad()
def reference_init_(module: nn.Module) -> None:
    """The `full` baseline's init, at the std a bank gives the same weight (`core.plan_types.init_std`):
    Kaiming normal (fan_out) for convolutions, PyTorch's default U(+-1/sqrt(fan_in)) for linear layers; zero
    biases, as the bank's members have."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nn.init.normal_(m.weight, 0.0, init_std(tuple(m.weight.shape)))
        elif isinstance(m, nn.Linear):
            bound = math.sqrt(3.0) * init_std(tuple(m.weight.shape))  # = 1/sqrt(fan_in)
            nn.init.uniform_(m.weight, -bound, bound)
        else:
            continue
        if m.bias is not None:
            m.bias.zero_()


def full_build(config, info, members, names, plan: None, channels_last: bool = False) -> StackedEnsemble:
    for m in members:
        reference_init_(m)
    return StackedEnsemble(members, names, info.mean, info.std, exit_weights=config.ensemble.exit_weights)


def full_summary(config: Config, slots, plan: None, c: Counts) -> dict:
    return {"budget": c.slot_weights, "bank_params": 0, "coefficient_params": 0, "private_params": c.private,
            "total_params": c.full, "full_ensemble_params": c.full, "members": c.rows, "groups": []}

"""Temporarily put a module in eval mode (shape tracing and FLOP counting run a batch of one)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module):
    """Eval mode inside the block, every submodule's training flag restored afterwards.

    A batch of one must not trip BatchNorm (1x1 maps at small inputs) nor update running statistics.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training

"""Forward FLOPs from torch's own counter (FLOPs = 2 x MACs), measured, not estimated."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .modes import eval_mode


def count_flops(fn, *args) -> int:
    """FLOPs of `fn(*args)` as counted by `torch.utils.flop_counter.FlopCounterMode`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def module_flops(module: nn.Module, example: Tensor) -> int:
    """Per-call FLOPs of a module on `example` in eval mode (meta tensors work: shapes are all it needs)."""
    with eval_mode(module):
        return count_flops(module, example)

"""Slot inventory and binding on any torch module (DESIGN.md step 1).

Architectures are written as ordinary PyTorch modules (Conv2d / Linear). The bank takes over their
weights: `trace_slots` lists them in forward order from shapes alone (run it on a meta-device copy),
`SlotBinding` swaps each weight Parameter for a generated tensor, and `materialize` returns a plain
module with ordinary Parameters and no bank attached.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .modes import eval_mode

SLOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def slot_kind(module: nn.Module) -> str:
    """Kernel kind of a slot: slots of different kinds never share SuperWeights."""
    if isinstance(module, nn.Linear):
        return "linear"
    kind = "conv" + "x".join(str(k) for k in module.kernel_size)
    if module.groups > 1:
        depthwise = module.groups == module.in_channels
        kind = ("dw" if depthwise else f"g{module.groups}") + kind
    return kind


def trace_slots(module: nn.Module, example: Tensor) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, kind, weight shape) of every conv/linear weight, in the order the forward pass uses them.

    Runs one forward pass; pass meta tensors (module and example on device "meta") to trace shapes
    without memory or compute. Modules never called come last, in registration order.
    """
    named = [(n, m) for n, m in module.named_modules() if isinstance(m, SLOT_TYPES)]
    order: dict[str, int] = {}
    handles = []
    for name, mod in named:
        def hook(_m, _inp, name=name):
            order.setdefault(name, len(order))
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), eval_mode(module):
            module(example)
    finally:
        for h in handles:
            h.remove()
    ranked = sorted(range(len(named)), key=lambda i: (order.get(named[i][0], len(named) + i)))
    return [(named[i][0], slot_kind(named[i][1]), tuple(named[i][1].weight.shape)) for i in ranked]


class SlotBinding:
    """Replaces the weight Parameters of a member's slot modules by tensors set before each forward."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.modules = [module.get_submodule(n) for n in names]
        for m in self.modules:
            del m.weight  # drop the Parameter: the bank owns this weight now
            m.weight = None

    def assign(self, weights: list[Tensor | None]) -> None:
        for m, w in zip(self.modules, weights):
            m.weight = w


def materialize(module: nn.Module, binding: SlotBinding, weights: list[Tensor]) -> nn.Module:
    """A deep copy of `module` whose slot weights are ordinary Parameters holding `weights`."""
    current = [m.weight for m in binding.modules]
    binding.assign([None] * len(binding.modules))  # generated tensors are not deep-copyable
    try:
        plain = copy.deepcopy(module)
    finally:
        binding.assign(current)
    names = {id(m): n for n, m in module.named_modules()}
    for m, w in zip(binding.modules, weights):
        target = plain.get_submodule(names[id(m)])
        del target.weight
        target.weight = nn.Parameter(w.detach().clone())
    return plain

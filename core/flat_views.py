"""Slot weights as views of one flat buffer, and their gradients concatenated back into one such buffer.

Generated weights exist once (`core.generation`, memory): a program writes every slot weight it generates
into one flat buffer and hands out `as_strided` views of it (metadata only, no kernel). In backward
`_flat_grads` lays the slot gradients out as that buffer in one concatenation, zeros where a slot weight
was not used. Shared by the SuperWeight and the SSN program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


@dataclass
class Views:
    """Slot `slots[j]` is buffer[offsets[j] : offsets[j] + numel] viewed as shapes[j]."""

    slots: list[int]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    strides: list[tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self):
        self.strides = [_contiguous_strides(s) for s in self.shapes]

    def views(self, buffer: Tensor) -> list[Tensor]:
        return [buffer.as_strided(s, st, buffer.storage_offset() + o)
                for s, st, o in zip(self.shapes, self.strides, self.offsets)]


def _flat_grads(grads, views: Views, total: int, like: Tensor) -> Tensor:
    """The slot gradients laid out as the buffer the slot weights view: one concatenation, zeros (slices of one
    zero buffer, metadata only) where a slot weight was not used and in the gaps between views."""
    sizes = [math.prod(s) for s in views.shapes]
    gaps = [b - (a + n) for a, n, b in zip(views.offsets, sizes, [*views.offsets[1:], total])]
    longest = max([0, views.offsets[0] if views.offsets else 0, *gaps,
                   *(n for g, n in zip(grads, sizes) if g is None)])
    zeros = like.new_zeros(longest) if longest else None
    parts = [zeros[: views.offsets[0]]] if views.offsets and views.offsets[0] else []
    for g, n, gap in zip(grads, sizes, gaps):
        parts.append(zeros[:n] if g is None else (g.view(-1) if g.is_contiguous() else g.reshape(-1)))
        if gap:
            parts.append(zeros[:gap])
    return torch.cat(parts)

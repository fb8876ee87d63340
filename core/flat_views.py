"""Slot weights as views of one flat buffer, and their gradients concatenated back into one such buffer.

Generated weights exist once (`core.generation`, memory): a program writes every slot weight it generates
into one flat buffer and hands out `as_strided` views of it (metadata only, no kernel). In backward
`_flat_grads` lays the slot gradients out as that buffer in one concatenation, zeros where a slot weight
was not used. A slot may be laid out in channels_last order (a SuperWeight bank made for channels_last
convolutions, `core.superweight_program`): its view has those strides, and its gradient is flattened in that
order. Shared by the SuperWeight and the SSN program.
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


def nhwc(shape: tuple[int, ...]) -> bool:
    """Whether a 4-d weight's channels_last order differs from its row-major one (more than one input channel and
    more than one kernel entry; otherwise the two orders are the same memory)."""
    return len(shape) == 4 and shape[1] > 1 and shape[2] * shape[3] > 1


def _strides(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    if not channels_last:
        return _contiguous_strides(shape)
    _, i, h, w = shape
    return (h * w * i, 1, w * i, i)


@dataclass
class Views:
    """Slot `slots[j]` is buffer[offsets[j] : offsets[j] + numel] viewed as shapes[j]: row-major, or in
    channels_last order ([O, kh, kw, I] in memory) where `channels_last[j]`."""

    slots: list[int]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    channels_last: list[bool] = field(default_factory=list)  # (default: none)
    strides: list[tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self):
        self.channels_last = list(self.channels_last) or [False] * len(self.shapes)
        self.strides = [_strides(s, c) for s, c in zip(self.shapes, self.channels_last)]

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
    for g, n, gap, cl in zip(grads, sizes, gaps, views.channels_last):
        if g is not None and cl:
            g = g.permute(0, 2, 3, 1)  # the buffer's order (a view where autograd gave a channels_last gradient)
        parts.append(zeros[:n] if g is None else (g.view(-1) if g.is_contiguous() else g.reshape(-1)))
        if gap:
            parts.append(zeros[:gap])
    return torch.cat(parts)

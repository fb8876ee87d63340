"""Cyclic windows of a flat parameter vector, with a backward that zero-fills the vector once.

A SuperWeight block's templates are K windows of `size` entries of theta_b, starting at given offsets and
wrapping around (DESIGN.md step 4). Built from K autograd slices, backward allocated and zero-filled a
full-length gradient of theta_b per window (`slice_backward`), the largest single cost of generation on
the digits plan (profiled: fill + slice backward ~25% of generation forward+backward). Here backward is
one `zeros(P)` plus in-place adds of each window's gradient, wrapped segments folded with one `sum`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cyclic(theta: Tensor, start: int, length: int) -> Tensor:
    """Entries start, start+1, ... (mod len(theta)) of a 1-D tensor: a view when nothing wraps."""
    p = theta.numel()
    start %= p
    if start + length <= p:
        return theta[start : start + length]
    return theta.repeat(-(-(start + length) // p))[start : start + length]


def _add_cyclic(out: Tensor, start: int, grad: Tensor) -> None:
    """out[(start + i) % P] += grad[i] for every i, in place."""
    p = out.numel()
    head = min(p - start, grad.numel())
    out[start : start + head] += grad[:head]
    rest = grad[head:]
    full = rest.numel() // p
    if full:
        out += rest[: full * p].view(full, p).sum(0)
    tail = rest[full * p :]
    if tail.numel():
        out[: tail.numel()] += tail


class _CyclicWindows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta: Tensor, starts: tuple[int, ...], size: int) -> Tensor:
        ctx.starts, ctx.numel = starts, theta.numel()
        return torch.stack([cyclic(theta, s, size) for s in starts])

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_zeros(ctx.numel)
        for k, s in enumerate(ctx.starts):
            _add_cyclic(out, s % ctx.numel, grad[k])
        return out, None, None


def cyclic_windows(theta: Tensor, starts: list[int] | tuple[int, ...], size: int) -> Tensor:
    """[len(starts), size]: row k holds theta[(starts[k] + i) % len(theta)] for i < size."""
    return _CyclicWindows.apply(theta, tuple(starts), size)

"""The SSN program: wavg slots by chunked matmuls, repeat and mask slots by one gather of the bank, inter
slots by one interpolation per distinct (grid, shape).

The SSN half of the batched generation (`core.generation` has the design; `core.ssn` the method: modes,
phases, masks). wavg slots have one coefficient row, so their matmul output (times the gains) is their
weight buffer; `run_ssn` is what `core.ssn.SSNBank` calls once per step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked_matmul import SCATTER, Item, MatmulLayout, Matmuls, _Matmul, build_matmuls
from .flat_views import Views, _flat_grads, nhwc
from .run_gather import INDEX


def ssn_wavg_starts(plan, i: int) -> tuple[int, ...]:
    lay, s, p = plan.slot_layout[i], plan.slots[i].numel, plan.groups[plan.slot_layout[i].group].params
    if plan.layout == "chained":
        return tuple((lay.phase + k * s) % p for k in range(lay.templates))
    return tuple(k * p // lay.templates for k in range(lay.templates))


def ssn_items(plan) -> list[Item]:
    items = []
    for i, (spec, lay) in enumerate(zip(plan.slots, plan.slot_layout)):
        if lay.mode == "wavg":
            g = plan.groups[lay.group]
            items.append(Item(i, lay.templates, 1, spec.numel, g.offset, g.params, ssn_wavg_starts(plan, i),
                              (tuple(lay.coef_offset + k for k in range(lay.templates)),)))
    return items


@dataclass
class SSNProgram:
    matmuls: Matmuls
    wavg: Views  # wavg slots: views of the matmul output (R = 1: a slot's chunks are consecutive)
    wavg_gain: Tensor  # slot id of every chunk of the matmul output (its gain)
    direct: Views  # repeat / mask slots: views of one gather of the bank
    d_index: Tensor  # bank entry of every entry of that gather (repeat/mask slots, then inter sources)
    m_index: Tensor | None  # mask plans: per repeat/mask entry, its mask coefficient or ONE (= coefficient_params)
    direct_slot: Tensor  # slot id of every repeat/mask entry (its gain)
    n_direct: int  # repeat/mask entries (first in the gather)
    inter: list[tuple[tuple[int, int], tuple[int, ...], list[int], Tensor]]  # (grid, shape, slots, slot ids)
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def flops(self) -> int:
        return self.matmuls.flops

    def to(self, device: torch.device) -> SSNProgram:
        if self.d_index.device == device:
            return self
        hit = self._on.get(device)
        if hit is None:
            mm = self.matmuls.to(device)
            hit = self._on[device] = replace(
                self, matmuls=mm, wavg_gain=self.wavg_gain.to(device), d_index=self.d_index.to(device),
                m_index=None if self.m_index is None else self.m_index.to(device),
                direct_slot=self.direct_slot.to(device),
                inter=[(g, s, ids, t.to(device)) for g, s, ids, t in self.inter], _on={})
        return hit


def ssn_program(plan, layout: MatmulLayout, slot_ids: list[int], channels_last: bool = False) -> SSNProgram:
    """The program generating `slot_ids` (sorted, distinct). `channels_last`: a bank for channels_last convolutions
    reads a wavg, repeat or mask slot's vector as [O, kh, kw, I] and hands it out as a channels_last view of the
    same memory (no copy either way); inter slots stay row-major (their interpolation runs over [O, I kh kw])."""
    wanted = set(slot_ids)

    def cl(ids: list[int]) -> list[bool]:
        return [channels_last and nhwc(plan.slots[i].shape) for i in ids]

    mm = build_matmuls(layout, wanted.__contains__)
    c = mm.chunk
    w_slots = sorted((i for i in slot_ids if plan.slot_layout[i].mode == "wavg"), key=lambda i: mm.place[i][0])
    w_offsets = [mm.place[i][0] for i in w_slots]
    wavg = Views(w_slots, [plan.slots[i].shape for i in w_slots], w_offsets, cl(w_slots))
    wavg_gain = torch.zeros(mm.out_numel // c, dtype=torch.long)
    for i, o in zip(w_slots, w_offsets):
        wavg_gain[o // c : o // c + -(-plan.slots[i].numel // c)] = i
    d_parts, m_parts, owners, d_slots, d_offsets = [], [], [], [], []
    one = plan.coefficient_params
    start = 0
    for i in slot_ids:
        lay, spec = plan.slot_layout[i], plan.slots[i]
        if lay.mode not in ("repeat", "mask"):
            continue
        g = plan.groups[lay.group]
        p, n = g.params, spec.numel
        d_parts.append(g.offset + (lay.phase + torch.arange(n)) % p)  # mask: phase 0, copy 0 is theta_g
        if lay.mode == "mask":
            m_parts.append(torch.cat((torch.full((p,), one), lay.coef_offset + torch.arange(n - p))))
        owners.append(torch.full((n,), i))
        d_slots.append(i)
        d_offsets.append(start)
        start += n
    inter: dict[tuple, list[int]] = defaultdict(list)
    for i in slot_ids:
        lay = plan.slot_layout[i]
        if lay.mode == "inter":
            inter[(tuple(lay.grid), plan.slots[i].shape)].append(i)
    buckets = []
    for (grid, shape), ids in sorted(inter.items()):
        for i in ids:
            lay = plan.slot_layout[i]
            g = plan.groups[lay.group]
            d_parts.append(g.offset + (lay.phase + torch.arange(grid[0] * grid[1])) % g.params)
        buckets.append((grid, shape, ids, torch.tensor(ids, dtype=INDEX)))
    def cat(ps, dtype):
        return torch.cat(ps).to(dtype) if ps else torch.zeros(0, dtype=dtype)
    return SSNProgram(mm, wavg, wavg_gain.to(INDEX), Views(d_slots, [plan.slots[i].shape for i in d_slots], d_offsets, cl(d_slots)),
                      cat(d_parts, SCATTER), cat(m_parts, SCATTER) if m_parts else None, cat(owners, INDEX), start,
                      buckets)


class _Scale(torch.autograd.Function):
    """x * gains[index] (one gain per row of x viewed as [len(index), -1]), returned as the views `views` of
    the result (x is then free: weights exist once). The gains are fixed buffers (no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, gains: Tensor, index: Tensor, views: Views, use_gains: bool):
        y = x.view(index.numel(), -1) * gains.index_select(0, index).unsqueeze(1) if use_gains else x.clone()
        ctx.views, ctx.use_gains, ctx.numel = views, use_gains, x.numel()
        ctx.save_for_backward(gains, index)
        return tuple(views.views(y.view(-1)))

    @staticmethod
    def backward(ctx, *grads):
        gains, index = ctx.saved_tensors
        ref = next(g for g in grads if g is not None)
        g = _flat_grads(grads, ctx.views, ctx.numel, ref)  # our own buffer: scaled in place
        if ctx.use_gains:
            g.view(index.numel(), -1).mul_(gains.index_select(0, index).unsqueeze(1))
        return g, None, None, None, None


def run_ssn(program: SSNProgram, bank: Tensor, coefficients: Tensor, gains: Tensor | None,
            n_slots: int) -> list[Tensor | None]:
    """Slot weights (times `gains` unless None) of the program's slots in plan order, None for the others."""
    result: list[Tensor | None] = [None] * n_slots
    use = gains is not None
    g_ = gains if use else bank.detach()
    if program.wavg.slots:
        out = _Matmul.apply(bank, coefficients, program.matmuls)
        for i, w in zip(program.wavg.slots, _Scale.apply(out, g_, program.wavg_gain, program.wavg, use)):
            result[i] = w
    if program.d_index.numel():
        read = _gather(bank, program.d_index)
        if program.direct.slots:
            direct = read[: program.n_direct]
            if program.m_index is not None:
                direct = direct * _gather(torch.cat((coefficients, coefficients.new_ones(1))), program.m_index)
            for i, w in zip(program.direct.slots, _Scale.apply(direct, g_, program.direct_slot, program.direct, use)):
                result[i] = w
        start = program.n_direct
        for (h, w_), shape, ids, index in program.inter:
            n = len(ids)
            src = read[start : start + n * h * w_].view(n, 1, h, w_)
            start += n * h * w_
            up = F.interpolate(src, size=(shape[0], math.prod(shape[1:])), mode="bilinear", align_corners=True)
            if use:
                up = up.view(n, -1) * gains.index_select(0, index).unsqueeze(1)
            for i, w in zip(ids, up.view(n, -1).unbind(0)):
                result[i] = w.view(shape)
    return result


class _Gather(torch.autograd.Function):
    """src[index] (1-D) whose backward is one scatter_add_ into zeros."""

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.numel = src.numel()
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.numel).scatter_add_(0, index, grad.contiguous()), None


def _gather(src: Tensor, index: Tensor) -> Tensor:
    return _Gather.apply(src, index)

"""The SuperWeight program: chunked matmuls, then slot weights assembled from the grid cells they contain.

Step 2 of the batched generation (`core.generation` has the design): per requested slot set, index
tensors (built once) that gather each slot's cells, as runs of `u` entries, out of the matmul output into
one flat weight buffer and apply each slot's fixed gain; their backward scatters the gradients back.
`run_superweights` is what `core.bank.SuperWeightBank` calls once per step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .chunked_matmul import INDEX, SCATTER, Item, MatmulLayout, Matmuls, _Matmul, build_matmuls
from .flat_views import Views, _flat_grads


@dataclass
class Assembly:
    """Runs of `unit` entries gathered from the matmul output into weight[start : start + rows.numel() * unit]."""

    unit: int
    start: int
    rows: Tensor  # run index into the matmul output viewed as [-1, unit], in weight order
    run_slot: Tensor  # slot id of every run (its gain)


@dataclass
class SWProgram:
    matmuls: Matmuls
    assemblies: list[Assembly]
    views: Views
    numel: int
    blocks: list[int]  # block ids the program computes
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def flops(self) -> int:
        return self.matmuls.flops

    def to(self, device: torch.device) -> SWProgram:
        if self.matmuls.device == device:
            return self
        hit = self._on.get(device)
        if hit is None:
            mm = self.matmuls.to(device)
            asm = [replace(a, rows=a.rows.to(device), run_slot=a.run_slot.to(device)) for a in self.assemblies]
            hit = self._on[device] = replace(self, matmuls=mm, assemblies=asm, _on={})
        return hit


def sw_items(plan) -> list[Item]:
    items = []
    for b in plan.blocks:
        rows = tuple(tuple(b.coef_offset + r * b.templates + k for k in range(b.templates))
                     for r in range(len(b.coef_sets)))
        items.append(Item(b.id, b.templates, len(b.coef_sets), b.size, b.offset, b.params,
                          tuple(b.window_starts()), rows))
    return items


def sw_units(plan, chunk: int) -> list[int]:
    """Per group, the run length of its slots' assembly: gcd of the chunk and its cells' row widths."""
    units = [chunk] * len(plan.groups)
    for b in plan.blocks:
        units[b.group] = math.gcd(units[b.group], b.size // b.shape[0])
    return units


def sw_program(plan, layout: MatmulLayout, units: list[int], slot_ids: list[int]) -> SWProgram:
    """The program generating `slot_ids` (sorted, distinct) from only the blocks they read."""
    cells = {i: plan.slot_cells(i) for i in slot_ids}
    blocks = sorted({bid for i in slot_ids for row in cells[i] for bid in row})
    wanted = set(blocks)
    mm = build_matmuls(layout, wanted.__contains__)
    by_unit: dict[int, list[int]] = defaultdict(list)
    for i in slot_ids:
        by_unit[units[plan.slot_group[i]]].append(i)
    assemblies, order, offsets, start = [], [], [], 0
    for u in sorted(by_unit):
        rows, owners, first = [], [], start
        for i in by_unit[u]:
            spec = plan.slots[i]
            kk = spec.numel // (spec.shape[0] * spec.shape[1])
            grid = torch.empty(spec.shape[0], spec.shape[1] * kk // u, dtype=torch.long)
            coef = plan.slot_coef[i]
            for row in cells[i]:
                for bid in row:
                    blk = plan.blocks[bid]
                    r = blk.coef_sets.index(coef)
                    width = blk.size // blk.shape[0]  # entries per row of the cell
                    o0, c0 = blk.out_range[0], blk.in_range[0] * kk // u
                    entry = (torch.arange(blk.shape[0]).unsqueeze(1) * width
                             + torch.arange(0, width, u)).flatten()  # run starts inside the block
                    pos = mm.positions(bid, r, entry) // u
                    grid[o0 : o0 + blk.shape[0], c0 : c0 + width // u] = pos.view(blk.shape[0], width // u)
            rows.append(grid.flatten())
            owners.append(torch.full((grid.numel(),), i, dtype=torch.long))
            order.append(i)
            offsets.append(start)
            start += spec.numel
        assemblies.append(Assembly(u, first, torch.cat(rows).to(SCATTER), torch.cat(owners).to(INDEX)))
    views = Views(order, [plan.slots[i].shape for i in order], offsets)
    return SWProgram(mm, assemblies, views, start, blocks)


class _Assemble(torch.autograd.Function):
    """Slot weights (views of one flat buffer) gathered from the matmul output, times each slot's gain."""

    @staticmethod
    def forward(ctx, out: Tensor, gains: Tensor, program: SWProgram, use_gains: bool):
        weight = out.new_empty(program.numel)
        for a in program.assemblies:
            dest = weight[a.start : a.start + a.rows.numel() * a.unit].view(-1, a.unit)
            torch.index_select(out.view(-1, a.unit), 0, a.rows, out=dest)
            if use_gains:
                dest.mul_(gains.index_select(0, a.run_slot).unsqueeze(1))
        ctx.program, ctx.use_gains, ctx.out_numel = program, use_gains, out.numel()
        if use_gains:
            ctx.save_for_backward(gains)
        return tuple(program.views.views(weight))

    @staticmethod
    def backward(ctx, *grads):
        program = ctx.program
        ref = next(g for g in grads if g is not None)
        flat = _flat_grads(grads, program.views, program.numel, ref)
        g_out = ref.new_zeros(ctx.out_numel)
        gains = ctx.saved_tensors[0] if ctx.use_gains else None
        for a in program.assemblies:
            runs = flat[a.start : a.start + a.rows.numel() * a.unit].view(-1, a.unit)
            if gains is not None:
                runs.mul_(gains.index_select(0, a.run_slot).unsqueeze(1))  # `flat` is our own buffer
            # an expanded index takes scatter_add_'s fast path (sorted, parallel): ~8x faster than index_add_
            g_out.view(-1, a.unit).scatter_add_(0, a.rows.unsqueeze(1).expand(-1, a.unit), runs)
        return g_out, None, None, None


def run_superweights(program: SWProgram, bank: Tensor, coefficients: Tensor, gains: Tensor | None,
                     n_slots: int) -> list[Tensor | None]:
    """Slot weights (times `gains` unless None) of the program's slots in plan order, None for the others."""
    out = _Matmul.apply(bank, coefficients, program.matmuls)
    weights = _Assemble.apply(out, bank if gains is None else gains, program, gains is not None)
    result: list[Tensor | None] = [None] * n_slots
    for i, w in zip(program.views.slots, weights):
        result[i] = w
    return result

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

from .chunked_matmul import SCATTER, Item, MatmulLayout, Matmuls, _Matmul, build_matmuls
from .flat_views import Views, _flat_grads
from .run_gather import INDEX


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
    views: Views  # where each slot's gradient goes in backward's flat buffer (duplicates after everything)
    numel: int  # entries of the forward buffer (the assembled slots; duplicates view them)
    blocks: list[int]  # block ids the program computes
    weight_views: Views  # where each slot's weight is in the forward buffer (a duplicate: its original's)
    fold_unit: int  # backward: every duplicate's gradient, in runs of this many entries, ...
    fold_rows: Tensor | None  # ... is added onto its original's run (its index in flat viewed as runs)
    grad_numel: int  # entries of backward's flat buffer
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
            rows = None if self.fold_rows is None else self.fold_rows.to(device)
            hit = self._on[device] = replace(self, matmuls=mm, assemblies=asm, fold_rows=rows, _on={})
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
    """The program generating `slot_ids` (sorted, distinct) from only the blocks they read.

    Duplicates are generated once: corresponding slots of the same shape (a wrn-16-4 and a wrn-10-4 slot in
    one depth bin) read the same cells with the same coefficient set, so until unsharing their weights are
    the same numbers (the gain too: it is measured on those numbers for the same target std). On the digits
    plan that is 21 of 56 slots, 23% of the generated entries. A duplicate's weight is a view of its
    original's; in backward its gradient gets a place of its own in the flat buffer and is added onto the
    original's (one row scatter for all duplicates) before the gains and the scatter into the matmul output."""
    cells = {i: plan.slot_cells(i) for i in slot_ids}
    blocks = sorted({bid for i in slot_ids for row in cells[i] for bid in row})
    wanted = set(blocks)
    mm = build_matmuls(layout, wanted.__contains__)
    copies: dict[tuple, list[int]] = defaultdict(list)  # same generated numbers -> slots, first is the original
    for i in slot_ids:
        copies[(plan.slots[i].shape, plan.slot_coef[i], plan.slot_group[i], tuple(map(tuple, cells[i])))].append(i)
    by_unit: dict[int, list[list[int]]] = defaultdict(list)
    for same in copies.values():
        by_unit[units[plan.slot_group[same[0]]]].append(same)
    assemblies, order, offsets, weight_at, start = [], [], [], {}, 0
    for u in sorted(by_unit):
        rows, owners, first = [], [], start
        for same in by_unit[u]:
            i = same[0]
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
            weight_at[i] = start
            start += spec.numel
        assemblies.append(Assembly(u, first, torch.cat(rows).to(SCATTER), torch.cat(owners).to(INDEX)))
    numel, grad_at, dup_of = start, start, []
    for same in copies.values():  # duplicates' gradients after every original's
        for dup in same[1:]:
            order.append(dup)
            offsets.append(grad_at)
            weight_at[dup] = weight_at[same[0]]
            dup_of.append((weight_at[dup], plan.slots[dup].numel))
            grad_at += plan.slots[dup].numel
    fold_unit = math.gcd(*(plan.slots[i].numel for i in slot_ids))  # every offset is a multiple of it
    fold_rows = (torch.cat([torch.arange(at // fold_unit, (at + n) // fold_unit) for at, n in dup_of]).unsqueeze(1)
                 if dup_of else None)
    shapes = [plan.slots[i].shape for i in order]
    return SWProgram(mm, assemblies, Views(order, shapes, offsets), numel, blocks,
                     Views(order, shapes, [weight_at[i] for i in order]), fold_unit, fold_rows, grad_at)


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
        return tuple(program.weight_views.views(weight))

    @staticmethod
    def backward(ctx, *grads):
        program = ctx.program
        ref = next(g for g in grads if g is not None)
        flat = _flat_grads(grads, program.views, program.grad_numel, ref)
        if program.fold_rows is not None:  # every duplicate's gradient onto its original's, in one scatter
            v, dups = program.fold_unit, flat[program.numel :].view(-1, program.fold_unit)
            flat[: program.numel].view(-1, v).scatter_add_(0, program.fold_rows.expand(-1, v), dups)
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

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

from .chunked_matmul import Item, MatmulLayout, Matmuls, _Matmul, build_matmuls
from .flat_views import Views, _flat_grads
from .gather_adjoint import GatherAdjoint, adjoint_of, gather_adjoint
from .run_gather import INDEX, RunGather, gather_runs, longest_runs


@dataclass
class SWProgram:
    matmuls: Matmuls
    assembly: RunGather  # the forward buffer (the slots, duplicates not repeated; padded to whole runs) <- out
    adjoint: GatherAdjoint  # backward: the matmul-output gradient <- the gradient buffer (duplicates included)
    gain_unit: int  # every slot's entries are whole rows of this many entries (the gcd of the slot sizes) ...
    weight_row_slot: Tensor  # ... so a slot id per row of the forward buffer applies the gains in one multiply
    grad_row_slot: Tensor  # and one per row of the gradient buffer (a duplicate's: its original's gain)
    views: Views  # where each slot's gradient goes in backward's flat buffer (duplicates after everything)
    numel: int  # entries of the forward buffer (the assembled slots; duplicates view them)
    blocks: list[int]  # block ids the program computes
    weight_views: Views  # where each slot's weight is in the forward buffer (a duplicate: its original's)
    grad_numel: int  # entries of backward's flat buffer
    _on: dict = field(default_factory=dict, repr=False)
    _gain_memo: tuple | None = field(default=None, repr=False)  # (gains, its version, the two row-gain tensors)

    def gain_rows(self, gains: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's gain (forward buffer, gradient buffer), [rows, 1]. Memoised on the gains tensor and its
        version: gains change only when reset or loaded (in place, which bumps the version), and expanding them
        per row was two serial index_selects, 0.55 ms of each digits step."""
        memo = self._gain_memo
        if memo is None or memo[0] is not gains or memo[1] != gains._version:
            memo = self._gain_memo = (gains, gains._version,
                                      (gains.index_select(0, self.weight_row_slot).unsqueeze(1),
                                       gains.index_select(0, self.grad_row_slot).unsqueeze(1)))
        return memo[2]

    @property
    def flops(self) -> int:
        return self.matmuls.flops

    def index_tensors(self) -> tuple[Tensor, ...]:
        return (*self.matmuls.index_tensors(), *self.assembly.tensors(), *self.adjoint.tensors(),
                self.weight_row_slot, self.grad_row_slot)

    def to(self, device: torch.device) -> SWProgram:
        if self.matmuls.device == device:
            return self
        hit = self._on.get(device)
        if hit is None:
            hit = self._on[device] = replace(
                self, matmuls=self.matmuls.to(device), assembly=self.assembly.to(device),
                adjoint=self.adjoint.to(device), weight_row_slot=self.weight_row_slot.to(device),
                grad_row_slot=self.grad_row_slot.to(device), _on={}, _gain_memo=None)
        return hit


def sw_items(plan) -> list[Item]:
    items = []
    for b in plan.blocks:
        rows = tuple(tuple(b.coef_offset + r * b.templates + k for k in range(b.templates))
                     for r in range(len(b.coef_sets)))
        items.append(Item(b.id, b.templates, len(b.coef_sets), b.size, b.offset, b.params,
                          tuple(b.window_starts()), rows))
    return items


def _slot_index(plan, mm: Matmuls, i: int, cells) -> Tensor:
    """Where every entry of slot i's weight (row-major) is in the matmul output: its cells, concatenated."""
    spec = plan.slots[i]
    kk = spec.numel // (spec.shape[0] * spec.shape[1])
    grid = torch.empty(spec.shape[0], spec.shape[1] * kk, dtype=torch.long)
    for row in cells:
        for bid in row:
            blk = plan.blocks[bid]
            width = blk.size // blk.shape[0]  # entries per row of the cell
            o0, c0 = blk.out_range[0], blk.in_range[0] * kk
            pos = mm.positions(bid, blk.coef_sets.index(plan.slot_coef[i]), torch.arange(blk.size))
            grid[o0 : o0 + blk.shape[0], c0 : c0 + width] = pos.view(blk.shape[0], width)
    return grid.flatten()


def _row_slots(slots: list[int], numels: list[int], unit: int) -> Tensor:
    return torch.repeat_interleave(torch.tensor(slots, dtype=torch.long), torch.tensor(numels) // unit).to(INDEX)


def sw_program(plan, layout: MatmulLayout, slot_ids: list[int]) -> SWProgram:
    """The program generating `slot_ids` (sorted, distinct) from only the blocks they read.

    Assembly: a slot weight is a row-major concatenation of grid cells, so in the matmul output it is a
    sequence of runs (a cell's rows); one gather by runs (`core.run_gather`, a few entries fixed where a cell
    row is shorter than a run, as in the 1-channel stem) copies every slot into one flat buffer, and one
    multiply applies the gains. Backward is the adjoint of that gather (`core.gather_adjoint`): a gather by
    runs into the matmul-output gradient (no zero fill) plus a few layers for entries several slots read.

    Duplicates are generated once: corresponding slots of the same shape (a wrn-16-4 and a wrn-10-4 slot in
    one depth bin) read the same cells with the same coefficient set, so until unsharing their weights are
    the same numbers (the gain too: it is measured on those numbers for the same target std). On the digits
    plan that is 21 of 56 slots, 23% of the generated entries. A duplicate's weight is a view of its
    original's; in backward its gradient gets a place of its own in the flat buffer and is one more reader of
    the original's entries in the adjoint (no separate fold)."""
    cells = {i: plan.slot_cells(i) for i in slot_ids}
    blocks = sorted({bid for i in slot_ids for row in cells[i] for bid in row})
    mm = build_matmuls(layout, set(blocks).__contains__)
    copies: dict[tuple, list[int]] = defaultdict(list)  # same generated numbers -> slots, first is the original
    for i in slot_ids:
        copies[(plan.slots[i].shape, plan.slot_coef[i], plan.slot_group[i], tuple(map(tuple, cells[i])))].append(i)
    originals = [same[0] for same in copies.values()]
    parts, order, offsets, weight_at, start = [], [], [], {}, 0
    slot_index = {i: _slot_index(plan, mm, i, cells[i]) for i in originals}
    for i in originals:
        parts.append(slot_index[i])
        order.append(i)
        offsets.append(start)
        weight_at[i] = start
        start += plan.slots[i].numel
    numel, grad_at, dup_original = start, start, []
    for same in copies.values():  # duplicates' gradients after every original's
        for dup in same[1:]:
            order.append(dup)
            offsets.append(grad_at)
            weight_at[dup] = weight_at[same[0]]
            parts.append(slot_index[same[0]])
            dup_original.append(same[0])
            grad_at += plan.slots[dup].numel
    index = torch.cat(parts)
    unit = math.gcd(*(plan.slots[i].numel for i in slot_ids))
    sizes = [plan.slots[i].numel for i in originals]
    weight_row_slot = _row_slots(originals, sizes, unit)
    grad_row_slot = _row_slots([*originals, *dup_original], [*sizes, *(plan.slots[i].numel for i in dup_original)],
                               unit)
    shapes = [plan.slots[i].shape for i in order]
    return SWProgram(mm, longest_runs(index[:numel], mm.out_numel),
                     gather_adjoint(index, torch.ones(index.numel(), dtype=torch.bool), mm.out_numel), unit,
                     weight_row_slot, grad_row_slot, Views(order, shapes, offsets), numel, blocks,
                     Views(order, shapes, [weight_at[i] for i in order]), grad_at)


class _Assemble(torch.autograd.Function):
    """Slot weights (views of one flat buffer) gathered from the matmul output, times each slot's gain."""

    @staticmethod
    def forward(ctx, out: Tensor, gains: Tensor, program: SWProgram, use_gains: bool):
        weight = gather_runs(program.assembly, out)
        if use_gains:
            weight[: program.numel].view(-1, program.gain_unit).mul_(program.gain_rows(gains)[0])
        ctx.program, ctx.use_gains, ctx.out_numel = program, use_gains, out.numel()
        if use_gains:
            ctx.save_for_backward(gains)
        return tuple(program.weight_views.views(weight))

    @staticmethod
    def backward(ctx, *grads):
        program = ctx.program
        ref = next(g for g in grads if g is not None)
        # + the zero entry the adjoint reads for matmul-output entries no slot reads (chunk padding)
        flat = _flat_grads(grads, program.views, program.grad_numel + 1, ref)
        if ctx.use_gains:  # `flat` is our own buffer
            flat[: program.grad_numel].view(-1, program.gain_unit).mul_(program.gain_rows(ctx.saved_tensors[0])[1])
        return adjoint_of(program.adjoint, flat, ctx.out_numel, ctx.out_numel), None, None, None


def run_superweights(program: SWProgram, bank: Tensor, coefficients: Tensor, gains: Tensor | None,
                     n_slots: int) -> list[Tensor | None]:
    """Slot weights (times `gains` unless None) of the program's slots in plan order, None for the others."""
    out = _Matmul.apply(bank, coefficients, program.matmuls)
    weights = _Assemble.apply(out, bank if gains is None else gains, program, gains is not None)
    result: list[Tensor | None] = [None] * n_slots
    for i, w in zip(program.views.slots, weights):
        result[i] = w
    return result

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
    row_slot: Tensor  # ... so a slot id per row of the buffer applies the gains in one multiply (both ways)
    views: Views  # where each original's gradient goes in backward's flat buffer: where its weight is
    numel: int  # entries of the forward buffer (the assembled slots; duplicates view them)
    blocks: list[int]  # block ids the program computes
    weight_views: Views  # where each slot's weight is in the forward buffer (a duplicate: its original's)
    dup_rounds: list[list[tuple[int, int]]]  # (duplicate, original) positions in weight_views, k-th copies in round k
    _on: dict = field(default_factory=dict, repr=False)
    _gain_memo: tuple | None = field(default=None, repr=False)  # (gains, its version, the row-gain tensor)

    def gain_rows(self, gains: Tensor) -> Tensor:
        """Each row's gain, [rows, 1]. Memoised on the gains tensor and its version: gains change only when
        reset or loaded (in place, which bumps the version), and expanding them per row was a serial
        index_select, ~0.3 ms of each digits step."""
        memo = self._gain_memo
        if memo is None or memo[0] is not gains or memo[1] != gains._version:
            memo = self._gain_memo = (gains, gains._version, gains.index_select(0, self.row_slot).unsqueeze(1))
        return memo[2]

    @property
    def flops(self) -> int:
        return self.matmuls.flops

    def index_tensors(self) -> tuple[Tensor, ...]:
        return (*self.matmuls.index_tensors(), *self.assembly.tensors(), *self.adjoint.tensors(), self.row_slot)

    def to(self, device: torch.device) -> SWProgram:
        if self.matmuls.device == device:
            return self
        hit = self._on.get(device)
        if hit is None:
            hit = self._on[device] = replace(
                self, matmuls=self.matmuls.to(device), assembly=self.assembly.to(device),
                adjoint=self.adjoint.to(device), row_slot=self.row_slot.to(device), _on={}, _gain_memo=None)
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
    original's; in backward its gradient is added to its original's (one `_foreach_add` per round of copies:
    one multi-tensor kernel on a GPU) before anything else, so the gradient buffer, the gain multiply and the
    adjoint see originals only: on digits that is 23% fewer entries through the three of them."""
    cells = {i: plan.slot_cells(i) for i in slot_ids}
    blocks = sorted({bid for i in slot_ids for row in cells[i] for bid in row})
    mm = build_matmuls(layout, set(blocks).__contains__)
    copies: dict[tuple, list[int]] = defaultdict(list)  # same generated numbers -> slots, first is the original
    for i in slot_ids:
        copies[(plan.slots[i].shape, plan.slot_coef[i], plan.slot_group[i], tuple(map(tuple, cells[i])))].append(i)
    originals = [same[0] for same in copies.values()]
    weight_at, start = {}, 0
    for same in copies.values():
        for i in same:
            weight_at[i] = start  # a duplicate views its original's weight
        start += plan.slots[same[0]].numel
    order = [*originals, *(dup for same in copies.values() for dup in same[1:])]  # duplicates after the originals
    position = {i: p for p, i in enumerate(order)}
    dup_rounds = [[(position[same[k]], position[same[0]]) for same in copies.values() if len(same) > k]
                  for k in range(1, max(map(len, copies.values()), default=1))]
    index = torch.cat([_slot_index(plan, mm, i, cells[i]) for i in originals])
    unit = math.gcd(*(plan.slots[i].numel for i in slot_ids))
    row_slot = _row_slots(originals, [plan.slots[i].numel for i in originals], unit)
    return SWProgram(mm, longest_runs(index, mm.out_numel),
                     gather_adjoint(index, torch.ones(index.numel(), dtype=torch.bool), mm.out_numel), unit,
                     row_slot, Views(originals, [plan.slots[i].shape for i in originals],
                                     [weight_at[i] for i in originals]),
                     start, blocks, Views(order, [plan.slots[i].shape for i in order], [weight_at[i] for i in order]),
                     dup_rounds)


def _add_duplicates(grads: list[Tensor], rounds: list[list[tuple[int, int]]]) -> list[Tensor]:
    """Each original's gradient plus its duplicates' (in copy order), one `_foreach_add` per round. (Every
    gradient is a tensor: autograd materialises an unused output's as zeros.)"""
    for pairs in rounds:
        sums = torch._foreach_add([grads[o] for _, o in pairs], [grads[d] for d, _ in pairs])
        for (_, o), s in zip(pairs, sums):
            grads[o] = s
    return grads


class _Assemble(torch.autograd.Function):
    """Slot weights (views of one flat buffer) gathered from the matmul output, times each slot's gain."""

    @staticmethod
    def forward(ctx, out: Tensor, gains: Tensor, program: SWProgram, use_gains: bool):
        weight = gather_runs(program.assembly, out)
        if use_gains:
            weight[: program.numel].view(-1, program.gain_unit).mul_(program.gain_rows(gains))
        ctx.program, ctx.use_gains, ctx.out_numel = program, use_gains, out.numel()
        if use_gains:
            ctx.save_for_backward(gains)
        return tuple(program.weight_views.views(weight))

    @staticmethod
    def backward(ctx, *grads):
        program = ctx.program
        grads = _add_duplicates(list(grads), program.dup_rounds)[: len(program.views.slots)]
        ref = grads[0]
        # + the zero entry the adjoint reads for matmul-output entries no slot reads (chunk padding)
        flat = _flat_grads(grads, program.views, program.numel + 1, ref)
        if ctx.use_gains:  # `flat` is our own buffer
            flat[: program.numel].view(-1, program.gain_unit).mul_(program.gain_rows(ctx.saved_tensors[0]))
        return adjoint_of(program.adjoint, flat, ctx.out_numel, ctx.out_numel), None, None, None


def run_superweights(program: SWProgram, bank: Tensor, coefficients: Tensor, gains: Tensor | None,
                     n_slots: int) -> list[Tensor | None]:
    """Slot weights (times `gains` unless None) of the program's slots in plan order, None for the others."""
    out = _Matmul.apply(bank, coefficients, program.matmuls)
    weights = _Assemble.apply(out, bank if gains is None else gains, program, gains is not None)
    result: list[Tensor | None] = [None] * n_slots
    for i, w in zip(program.weight_views.slots, weights):
        result[i] = w
    return result

"""The SuperWeight program: chunked matmuls, then slot weights assembled from the grid cells they contain.

Step 2 of the batched generation (`core.generation` has the design): per requested slot set, index
tensors (built once) that gather each slot's cells, in rows of `unit` entries, out of the matmul output into
one flat weight buffer, each row times its slot's fixed gain; their backward sends the gradients back.
`run_superweights` is what `core.bank.SuperWeightBank` calls once per step.

A slot weight is a row-major concatenation of grid cells, so cut into rows of `unit` entries (each slot starts at
a multiple of `unit`), almost every row is `unit` consecutive entries of one chunk row of the matmul output:
a whole row of its [-1, unit] view. The assembly is then one `embedding_bag` (mode "sum", bags of one, the gains
as per-sample weights): a gather of rows and the gain multiply in one pass (an `index_select` and a `mul_`
before: ~1.0 against ~0.7 ms on digits). The few entries in other rows (a 1-channel stem's cell rows are 9
entries; a slot's last, partial row) are gathered one by one. Backward, each matmul-output row's gradient is
the gain-weighted sum of the gradient rows of the weight rows that read it: one more `embedding_bag`, whose bags
are each output row's readers in weight order (and one `scatter_add_` for the entries done one by one). That
replaced a gain multiply, a gather by runs and its layered adds (`core.gather_adjoint`: ~1.2 against ~0.6 ms).

Whether a row is a whole output row depends on the slot alone (slots start at multiples of `unit`, and the unit
is chosen once per plan, `sw_rows`), never on which other slots a program holds: a member-parallel worker's
subset program computes its slots' entries with exactly the full program's operations (bit for bit, tested).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .bank_storage import Storage
from .chunked_matmul import Item, MatmulLayout, Matmuls, _Matmul, _round_up, build_matmuls
from .flat_views import Views, _flat_grads, nhwc
from .run_gather import INDEX, MAX_FIXES, RUNS

INDEX_FIELDS = ("rows", "fix_at", "fix_from", "adj_rows", "adj_offsets", "slot_ids", "slot_rows")


@dataclass
class SWProgram:
    matmuls: Matmuls
    unit: int  # entries per row of the weight buffer and of the matmul output's [-1, unit] view
    numel: int  # entries of the weight buffer: every original slot, each from a multiple of `unit`
    rows: Tensor  # [rows, 1]: the matmul-output row each weight row is (0 for rows done entry by entry)
    fix_at: Tensor  # int64: the weight entries done one by one ...
    fix_from: Tensor  # int64: ... and the matmul-output entries they are
    adj_rows: Tensor  # backward: the weight rows reading each matmul-output row, in order ...
    adj_offsets: Tensor  # ... each output row's first (its bag)
    slot_ids: Tensor  # the originals ...
    slot_rows: Tensor  # ... and their rows in the buffer, in order: each row's gain
    views: Views  # where each original's gradient goes in backward's flat buffer: where its weight is
    blocks: list[int]  # block ids the program computes
    weight_views: Views  # where each slot's weight is in the buffer (a duplicate: its original's)
    dup_rounds: list[list[tuple[int, int]]]  # (duplicate, original) positions in weight_views, k-th copies in round k
    _on: dict = field(default_factory=dict, repr=False)
    _gain_memo: tuple | None = field(default=None, repr=False)  # (gains, its version, the expanded gains)

    def gains_of(self, gains: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(per weight row [rows, 1], per adjoint bag entry, per entry done one by one); all None without gains
        (raw weights). Memoised on the gains
        tensor and its version: gains change only when reset or loaded (in place, which bumps the version), and
        expanding them is serial index_selects, ~0.3 ms of each digits step."""
        if gains is None:
            return None, None, None
        memo = self._gain_memo
        if memo is None or memo[0] is not gains or memo[1] != gains._version:
            per_row = torch.repeat_interleave(gains.index_select(0, self.slot_ids), self.slot_rows)
            per_row = torch.cat((per_row, per_row.new_ones(self.rows.shape[0] - per_row.numel())))  # (empty program)
            per = (per_row.unsqueeze(1), per_row.index_select(0, self.adj_rows),
                   per_row.index_select(0, self.fix_at // self.unit))
            memo = self._gain_memo = (gains, gains._version, per)
        return memo[2]

    @property
    def flops(self) -> int:
        return self.matmuls.flops

    def index_tensors(self) -> tuple[Tensor, ...]:
        return (*self.matmuls.index_tensors(), *(getattr(self, f) for f in INDEX_FIELDS))

    def to(self, device: torch.device) -> SWProgram:
        if self.matmuls.device == device:
            return self
        hit = self._on.get(device)
        if hit is None:
            hit = self._on[device] = replace(self, matmuls=self.matmuls.to(device), _on={}, _gain_memo=None,
                                             **{f: getattr(self, f).to(device) for f in INDEX_FIELDS})
        return hit


def halves(block) -> bool:
    """Whether a block's product is done on the two halves of theta_b (`sw_items`): two templates over exactly
    one template's worth of parameters (P_b == size_b, even), the usual block at default budgets (23 of 43 on
    the digits plan)."""
    return block.templates == 2 and block.params == block.size and block.size % 2 == 0


def sw_items(plan) -> list[Item]:
    """One matmul per block. A `halves` block's two templates are theta_b and theta_b rotated by h = P_b / 2, so
    with theta_b = [H0, H1] its set r is [a0 H0 + a1 H1, a0 H1 + a1 H0]: the matmul [a0 a1; a1 a0] @ [H0; H1]
    (rows r and R + r, each of h entries). Its operand is theta_b itself (P_b template entries, not 2 P_b: 20% of
    the digits plan's gathered templates), each bank entry read once, so the gradient's gather has no second
    layer; the same products (two-term sums commute exactly), so the same weights."""
    items = []
    for b in plan.blocks:
        rows = tuple(tuple(b.coef_offset + r * b.templates + k for k in range(b.templates))
                     for r in range(len(b.coef_sets)))
        if halves(b):
            h = b.size // 2
            items.append(Item(b.id, 2, 2 * len(rows), h, b.offset, b.params, (0, h), rows + tuple(r[::-1] for r in rows)))
        else:
            items.append(Item(b.id, b.templates, len(b.coef_sets), b.size, b.offset, b.params,
                              tuple(b.window_starts()), rows))
    return items


def block_positions(mm: Matmuls, block, row: int) -> Tensor:
    """Where the entries of coefficient set `row` of a block's product are in the matmul output (`sw_items`)."""
    if not halves(block):
        return mm.positions(block.id, row, torch.arange(block.size))
    e = torch.arange(block.size // 2)
    return torch.cat((mm.positions(block.id, row, e), mm.positions(block.id, len(block.coef_sets) + row, e)))


def _slot_index(plan, mm: Matmuls, i: int, cells, channels_last: bool = False) -> Tensor:
    """Where every entry of slot i's weight is in the matmul output: its cells, concatenated, in row-major order,
    or (`channels_last`: a bank made for channels_last convolutions) in channels_last order, [O, kh, kw, I].

    A cell's entries are its block's product read row-major as [Ob, Ib, kh, kw], or, in a channels_last bank,
    as [Ob, kh, kw, Ib] (the same template arithmetic, another fixed map from product entries to weight entries:
    the model such a bank defines). Either way a slot's rows in its own order are runs of consecutive product
    entries, whole rows of the assembly."""
    spec = plan.slots[i]
    out, inp = spec.shape[:2]
    kk = spec.numel // (out * inp)
    cl = channels_last and nhwc(spec.shape)
    grid = torch.empty((out, kk, inp) if cl else (out, inp * kk), dtype=torch.long)
    for row in cells:
        for bid in row:
            blk = plan.blocks[bid]
            (ob, ib), o0, i0 = blk.shape[:2], blk.out_range[0], blk.in_range[0]
            pos = block_positions(mm, blk, blk.coef_sets.index(plan.slot_coef[i]))
            if cl:
                grid[o0 : o0 + ob, :, i0 : i0 + ib] = pos.view(ob, kk, ib)
            else:  # (in a channels_last bank too: one input channel or a 1x1 kernel reads the same either way)
                grid[o0 : o0 + ob, i0 * kk : (i0 + ib) * kk] = pos.view(ob, ib * kk)
    return grid.flatten()


def _offsets(sizes: Tensor) -> Tensor:
    return (torch.cumsum(sizes, 0) - sizes).to(INDEX)


def _layout(plan, mm: Matmuls, originals: list[int], index: dict[int, Tensor], unit: int):
    """For one unit: (each original's offset in the buffer, the buffer's entries as matmul-output positions (-1:
    none), which rows are whole rows of the matmul output's [-1, unit] view)."""
    at, start = {}, 0
    for i in originals:
        at[i] = start
        start = _round_up(start + plan.slots[i].numel, unit)
    pos = torch.full((max(start, unit),), -1, dtype=torch.long)
    for i in originals:
        pos[at[i] : at[i] + index[i].numel()] = index[i]
    rows = pos.view(-1, unit)
    first = rows[:, 0]
    whole = (rows == first.unsqueeze(1) + torch.arange(unit)).all(1) & (first % unit == 0)  # (C % unit == 0)
    return at, pos, whole


def _copy_key(plan, i: int, cells) -> tuple:
    return plan.slots[i].shape, plan.slot_coef[i], plan.slot_group[i], tuple(map(tuple, cells))


def _originals(plan, mm: Matmuls, slot_ids: list[int], cells,
               channels_last: bool = False) -> tuple[dict[tuple, list[int]], dict[int, Tensor]]:
    """(slots generating the same numbers, the first the original; each original's matmul-output positions).

    Originals come in the order of their copies' first slot in the whole plan, not in the program's: a
    member-parallel worker whose original of some copies is a later member's slot (the full program's original
    is another worker's) still lays its weight rows out in the full program's relative order, so each adjoint
    bag sums its readers in the same order and the subset's gradients are the full ones bit for bit (in slot
    order they came out ~5e-7 apart on the digits plan's second default worker group)."""
    copies: dict[tuple, list[int]] = defaultdict(list)
    for i in slot_ids:
        copies[_copy_key(plan, i, cells[i])].append(i)
    first: dict[tuple, int] = {}
    for i in range(len(plan.slots)):
        first.setdefault(_copy_key(plan, i, plan.slot_cells(i)), i)
    copies = dict(sorted(copies.items(), key=lambda kv: first[kv[0]]))
    return copies, {same[0]: _slot_index(plan, mm, same[0], cells[same[0]], channels_last) for same in copies.values()}


def sw_rows(plan, layout: MatmulLayout, channels_last: bool = False) -> int:
    """The row unit of a plan's programs: the longest in `RUNS` (dividing the chunk) for which under `MAX_FIXES` of
    the generated entries fall in rows that are not whole matmul-output rows (they are gathered one by one)."""
    ids = list(range(len(plan.slots)))
    mm = build_matmuls(layout, lambda _: True)
    _, index = _originals(plan, mm, ids, {i: plan.slot_cells(i) for i in ids}, channels_last)
    total = max(sum(t.numel() for t in index.values()), 1)
    for unit in [u for u in RUNS if mm.chunk % u == 0]:
        _, pos, whole = _layout(plan, mm, list(index), index, unit)
        if int((pos.view(-1, unit)[~whole] >= 0).sum()) <= MAX_FIXES * total:
            break
    return unit


def sw_program(plan, layout: MatmulLayout, slot_ids: list[int], unit: int, storage: Storage | None = None,
               channels_last: bool = False) -> SWProgram:
    """The program generating `slot_ids` (sorted, distinct) from only the blocks they read, in rows of `unit`
    entries (`sw_rows`, of the whole plan), from a bank stored in `storage`'s order (`core.bank_storage`);
    `channels_last`: the bank's cells are read as [Ob, kh, kw, Ib] and conv slot weights are channels_last views
    (`_slot_index`).

    Duplicates are generated once: corresponding slots of the same shape (a wrn-16-4 and a wrn-10-4 slot in
    one depth bin) read the same cells with the same coefficient set, so until unsharing their weights are
    the same numbers (the gain too: it is measured on those numbers for the same target std). On the digits
    plan that is 21 of 56 slots, 23% of the generated entries. A duplicate's weight is a view of its
    original's; in backward its gradient is added to its original's (one `_foreach_add` per round of copies:
    one multi-tensor kernel on a GPU) before anything else, so the gradient buffer and the adjoint see
    originals only: on digits that is 23% fewer entries through both."""
    cells = {i: plan.slot_cells(i) for i in slot_ids}
    blocks = sorted({bid for i in slot_ids for row in cells[i] for bid in row})
    mm = build_matmuls(layout, set(blocks).__contains__, storage)
    copies, index = _originals(plan, mm, slot_ids, cells, channels_last)
    originals = list(index)
    at, pos, whole = _layout(plan, mm, originals, index, unit)
    first = pos.view(-1, unit)[:, 0]
    clean = whole.nonzero().flatten()
    out_row = first[clean] // unit
    rows = torch.zeros(first.numel(), dtype=torch.long)
    rows[clean] = out_row
    fix_at = ((pos.view(-1, unit) >= 0) & ~whole.unsqueeze(1)).flatten().nonzero().flatten()
    readers = torch.bincount(out_row, minlength=mm.out_numel // unit)
    weight_at = {i: at[same[0]] for same in copies.values() for i in same}  # a duplicate views its original's weight
    cl = {i: channels_last and nhwc(plan.slots[i].shape) for i in slot_ids}
    order = [*originals, *(dup for same in copies.values() for dup in same[1:])]  # duplicates after the originals
    position = {i: p for p, i in enumerate(order)}
    dup_rounds = [[(position[same[k]], position[same[0]]) for same in copies.values() if len(same) > k]
                  for k in range(1, max(map(len, copies.values()), default=1))]
    return SWProgram(
        mm, unit, pos.numel(), rows.to(INDEX).unsqueeze(1), fix_at, pos[fix_at],
        clean[torch.argsort(out_row, stable=True)].to(INDEX), _offsets(readers), torch.tensor(originals, dtype=INDEX),
        torch.tensor([-(-plan.slots[i].numel // unit) for i in originals], dtype=torch.long),
        Views(originals, [plan.slots[i].shape for i in originals], [at[i] for i in originals], [cl[i] for i in originals]),
        blocks, Views(order, [plan.slots[i].shape for i in order], [weight_at[i] for i in order], [cl[i] for i in order]),
        dup_rounds)


def _add_duplicates(grads: list[Tensor], rounds: list[list[tuple[int, int]]]) -> list[Tensor]:
    """Each original's gradient plus its duplicates' (in copy order), one `_foreach_add` per round. (Every
    gradient is a tensor: autograd materialises an unused output's as zeros.)"""
    for pairs in rounds:
        sums = torch._foreach_add([grads[o] for _, o in pairs], [grads[d] for d, _ in pairs])
        for (_, o), s in zip(pairs, sums):
            grads[o] = s
    return grads


def _bag_sum(rows: Tensor, src: Tensor, weights: Tensor | None, offsets: Tensor | None = None) -> Tensor:
    """Row i: the sum over bag i (row i of `rows` [n, 1], or `offsets`' segment of the 1-D `rows`) of weight * src row."""
    return F.embedding_bag(rows, src, offsets, mode="sum", per_sample_weights=weights)


class _Assemble(torch.autograd.Function):
    """Slot weights (views of one flat buffer) gathered from the matmul output, times each slot's gain."""

    @staticmethod
    def forward(ctx, out: Tensor, gains: Tensor, program: SWProgram, use_gains: bool):
        per = program.gains_of(gains if use_gains else None)
        # (detached: `out` still says requires_grad in here, and embedding_bag would then take its training
        # variant, which builds backward bookkeeping we never use: ~2x the time)
        weight = _bag_sum(program.rows, out.detach().view(-1, program.unit), per[0]).view(-1)
        if program.fix_at.numel():
            fixed = out.index_select(0, program.fix_from)
            weight.index_copy_(0, program.fix_at, fixed if per[2] is None else fixed * per[2])
        ctx.program, ctx.use_gains = program, use_gains
        if use_gains:
            ctx.save_for_backward(gains)
        return tuple(program.weight_views.views(weight))

    @staticmethod
    def backward(ctx, *grads):
        program = ctx.program
        grads = _add_duplicates(list(grads), program.dup_rounds)[: len(program.views.slots)]
        flat = _flat_grads(grads, program.views, program.numel, grads[0])
        per = program.gains_of(ctx.saved_tensors[0] if ctx.use_gains else None)
        g_out = _bag_sum(program.adj_rows, flat.view(-1, program.unit), per[1], program.adj_offsets).view(-1)
        if program.fix_at.numel():
            g_fix = flat.index_select(0, program.fix_at)
            g_out.scatter_add_(0, program.fix_from, g_fix if per[2] is None else g_fix * per[2])
        return g_out, None, None, None


def run_superweights(program: SWProgram, bank: Tensor, coefficients: Tensor, gains: Tensor | None,
                     n_slots: int) -> list[Tensor | None]:
    """Slot weights (times `gains` unless None) of the program's slots in plan order, None for the others."""
    out = _Matmul.apply(bank, coefficients, program.matmuls)
    weights = _Assemble.apply(out, bank if gains is None else gains, program, gains is not None)
    result: list[Tensor | None] = [None] * n_slots
    for i, w in zip(program.weight_views.slots, weights):
        result[i] = w
    return result

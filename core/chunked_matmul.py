"""Chunked matmuls: every block's alpha @ templates (and every SSN wavg slot's) as one bmm per (K, R) class.

Step 1 of the batched generation (`core.generation` has the design): the layout (chunk size and classes,
from the whole plan so that a subset program computes bit for bit the full one's values), the index tensors
that gather the templates and coefficients of each class out of the flat vectors, and the autograd
Function `_Matmul` whose forward is one bmm per class (two in backward, which keeps the gathered templates).
Both generation programs start here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .gather_adjoint import GatherAdjoint, adjoint_numel, adjoint_of, gather_adjoint
from .run_gather import RunGather, gather_runs, run_gather

CHUNKS = (512, 256, 128, 64, 32)  # candidate chunk sizes, largest first (entries; 32 floats = 128 bytes)
MAX_PADDING = 0.02  # largest chunk whose column padding adds at most this fraction of the matmul work
SCATTER = torch.int64  # index tensors also scattered with (scatter_add_ takes int64 only)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def row_class(rows: int) -> int:
    """Rows (coefficient sets) a matrix is padded to: exact up to 4, then 6 (a `halves` block of 3 sets has 6,
    and padding it to 8 cost more output than the halving saved), then the next power of two."""
    return rows if rows <= 4 else 6 if rows <= 6 else 1 << (rows - 1).bit_length()


def chunk_size(sizes: list[int]) -> int:
    total = sum(sizes)
    for c in CHUNKS:
        if sum(_round_up(s, c) for s in sizes) <= (1 + MAX_PADDING) * total:
            return c
    return CHUNKS[-1]


# -- chunked matmuls --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One matrix product alpha [rows, k] @ templates [k, size]: a SuperWeight block or an SSN wavg slot.

    Template k is the cyclic window of `size` entries of bank[offset : offset + params] starting at
    starts[k]; alpha row r, template k is coefficients[coef[r][k]]."""

    key: int  # block id (SuperWeights) or slot id (SSN)
    k: int
    rows: int
    size: int
    offset: int
    params: int
    starts: tuple[int, ...]
    coef: tuple[tuple[int, ...], ...]


def direct(it: Item, chunk: int) -> bool:
    """Whether an item's templates are its parameters cut into K consecutive slices of whole chunks (P = K size,
    template k from k size: a SuperWeight block at most of its budgets, `core.superweight_program.halves` blocks
    too). Its bmm operand [chunks, K, C] is then a permutation of its parameters, no entry twice: a bank stored in
    that order (`core.bank_storage`) is the operand itself, and the bmm writes its gradient."""
    return (it.params == it.k * it.size and it.size % chunk == 0
            and it.starts == tuple(k * it.size for k in range(it.k)))


@dataclass
class MatmulLayout:
    """Chunk size and (K, R, direct) classes of every item, from the whole plan (subset programs keep them)."""

    chunk: int
    classes: list[tuple[int, int]]  # (K, R) of each class, in order
    members: list[list[Item]]  # items of each class, in order
    direct: list[bool]  # classes of `direct` items (only where the caller's bank can be stored for them)


def matmul_layout(items: list[Item], split_direct: bool = False) -> MatmulLayout:
    chunk = chunk_size([it.size for it in items]) if items else CHUNKS[0]
    by: dict[tuple[int, int, bool], list[Item]] = defaultdict(list)
    for it in items:
        by[(it.k, row_class(it.rows), split_direct and direct(it, chunk))].append(it)
    classes = sorted(by)
    return MatmulLayout(chunk, [c[:2] for c in classes], [by[c] for c in classes], [c[2] for c in classes])


@dataclass
class Matmuls:
    """The bmm part of a program: one class per (K, R), chunks of `chunk` columns."""

    chunk: int
    shapes: list[tuple[int, int, int]]  # per class (chunks n, R, K)
    views: list[int | None]  # per class: where its operand starts in the bank, if it is a view of it (else gathered)
    view_end: int  # the views' operands lie in bank[:view_end]; every other template entry reads bank[view_end:]
    gaps: list[tuple[int, int]]  # the ranges of bank[:view_end] that are no view's (unread: zero gradient)
    templates: RunGather  # every template entry of the other classes (concatenated, [n, K, C] each) from the bank
    a_index: Tensor  # coefficient of every alpha entry, classes concatenated ([n, R, K] each)
    place: dict[int, tuple[int, int]]  # item key -> (first entry of its output in `out`, its R)
    out_numel: int
    bank_grad: GatherAdjoint
    bank_numel: int

    def to(self, device) -> Matmuls:
        return replace(self, templates=self.templates.to(device), a_index=self.a_index.to(device),
                       bank_grad=self.bank_grad.to(device))

    def index_tensors(self) -> tuple[Tensor, ...]:
        return (*self.templates.tensors(), self.a_index, *self.bank_grad.tensors())

    @property
    def device(self) -> torch.device:
        return self.a_index.device

    @property
    def t_numel(self) -> int:
        """Template entries gathered (the views' are read in place)."""
        return sum(n * k * self.chunk for (n, _, k), v in zip(self.shapes, self.views) if v is None)

    @property
    def flops(self) -> int:
        """FLOPs of the forward bmm (2 x multiply-adds, as torch.utils.flop_counter counts them)."""
        return sum(2 * n * r * k * self.chunk for n, r, k in self.shapes)

    def positions(self, key: int, row: int, entries: Tensor) -> Tensor:
        """Where entries `entries` of row `row` of item `key` are in the flat output."""
        first, rows = self.place[key]
        return first + (entries // self.chunk * rows + row) * self.chunk + entries % self.chunk


def _views(layout: MatmulLayout, keep, storage) -> tuple[dict[int, int], int, list[tuple[int, int]]]:
    """Which classes a program reads in place: (class index -> its operand's start in the bank, the end of the
    last view, the stored ranges between views the program does not read). A class of direct items that are,
    in order, consecutive items of the storage is a view, each past the previous one: in a full program every
    direct class, in a subset program (a member-parallel worker's) those whose kept items are still consecutive
    (on digits, every class of both default worker groups). Once a stored class is gathered, the later ones are
    too, and if any gathered item lies before the last view (classes in another order than the storage's, after
    unsharing), none is a view: every gathered entry must lie past the views."""
    if storage is None:
        return {}, 0, []
    starts, gaps, end, gathered, seen = {}, [], 0, False, []
    for ci, (items, is_direct) in enumerate(zip(layout.members, layout.direct)):
        keys = tuple(it.key for it in items if keep(it.key))
        if not keys:
            continue
        first = storage.rank.get(keys[0]) if is_direct and not gathered else None
        if first is not None and storage.keys[first : first + len(keys)] == keys and storage.segments[keys[0]][0] >= end:
            if storage.segments[keys[0]][0] > end:
                gaps.append((end, storage.segments[keys[0]][0]))
            starts[ci] = storage.segments[keys[0]][0]
            end = starts[ci] + sum(storage.segments[key][1] for key in keys)
        else:
            gathered = gathered or is_direct
            seen += [storage.segments[key][0] for key in keys]
    if any(at < end for at in seen):
        return {}, 0, []
    return starts, end, gaps


def build_matmuls(layout: MatmulLayout, keep, storage=None) -> Matmuls:
    """The program's matmuls: the classes' items `keep` (item key -> bool) keeps, gathered from a bank in
    `storage`'s order (a `core.bank_storage.Storage`, which imports this module; None: the items' own offsets),
    except the classes it reads in place (`_views`). Gathered or viewed, the same values at the same (2 KB)
    alignment: the same bmm results."""
    c = layout.chunk
    col = torch.arange(c)
    t_parts, real_parts, a_parts, shapes, views, place = [], [], [], [], [], {}
    bank_numel = max((it.offset + it.params for items in layout.members for it in items), default=0)
    view_at, view_end, gaps = _views(layout, keep, storage)
    out = 0
    for ci, ((k, r), items) in enumerate(zip(layout.classes, layout.members)):
        items = [it for it in items if keep(it.key)]
        if not items:
            continue
        view = ci in view_at
        n = 0
        for it in items:
            nj = -(-it.size // c)
            if not view:
                pos = (torch.arange(nj).unsqueeze(1) * c + col).view(nj, 1, c)  # [nj, 1, C] entry in the window
                starts = torch.tensor(it.starts).view(1, k, 1)
                idx = it.offset + (starts + pos) % it.params  # [nj, K, C]
                idx = torch.where(pos < it.size, idx, it.offset).flatten()
                t_parts.append(idx if storage is None else storage.at(it.key, it.offset, idx))
                real_parts.append((pos < it.size).expand(nj, k, c).flatten())
            alpha = torch.tensor(it.coef, dtype=torch.long)
            if it.rows < r:  # padded rows read coefficient row 0: never read, zero gradient
                alpha = torch.cat((alpha, alpha[:1].expand(r - it.rows, k)))
            a_parts.append(alpha.unsqueeze(0).expand(nj, r, k).flatten())
            place[it.key] = (out + n * r * c, r)
            n += nj
        shapes.append((n, r, k))
        views.append(view_at.get(ci))
        out += n * r * c

    def cat(parts, dtype=SCATTER):
        return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)

    # Gathered templates read bank[view_end:] only.
    t_index, real = cat(t_parts) - view_end, cat(real_parts, torch.bool)
    # The template gather by runs: a chunk of a cyclic window is C consecutive bank entries unless the window
    # wraps inside it (on 2 CPU cores the entry-wise gather of the digits plan's templates took twice as long).
    templates = run_gather(t_index, c, bank_numel - view_end)
    return Matmuls(c, shapes, views, view_end, gaps, templates, cat(a_parts), place, out,
                   gather_adjoint(t_index, real, bank_numel - view_end), bank_numel)


def _operands(mm: Matmuls, bank: Tensor, templates: Tensor, coefficients: Tensor):
    """Per class the bmm operands (templates [n, K, C]: a view of the bank or of the gathered templates; alphas
    [n, R, K]) from one gather of the coefficients."""
    alphas = coefficients.index_select(0, mm.a_index)
    a_sizes = [n * r * k for n, r, k in mm.shapes]
    ts, t0 = [], 0
    for (n, _, k), v in zip(mm.shapes, mm.views):
        if v is None:
            ts.append(templates[t0 : t0 + n * k * mm.chunk].view(n, k, mm.chunk))
            t0 += n * k * mm.chunk
        else:
            ts.append(bank[v : v + n * k * mm.chunk].view(n, k, mm.chunk))
    as_ = [a.view(n, r, k) for a, (n, r, k) in zip(alphas.split(a_sizes), mm.shapes)]
    return ts, as_


def _matmul_forward(mm: Matmuls, bank: Tensor, templates: Tensor, coefficients: Tensor) -> Tensor:
    out = templates.new_empty(mm.out_numel)
    ts, as_ = _operands(mm, bank, templates, coefficients)
    start = 0
    for t, a, (n, r, _) in zip(ts, as_, mm.shapes):
        torch.bmm(a, t, out=out[start : start + n * r * mm.chunk].view(n, r, mm.chunk))
        start += n * r * mm.chunk
    return out


def _matmul_backward(mm: Matmuls, bank: Tensor, templates: Tensor, coefficients: Tensor, grad: Tensor,
                     need_bank: bool, need_coef: bool) -> tuple[Tensor | None, Tensor | None]:
    ts, as_ = _operands(mm, bank, templates, coefficients)
    c = mm.chunk
    g_t = g_bank = None
    if need_bank:
        g_t = bank.new_empty(mm.t_numel + 1)  # + the zero entry `adjoint_of` reads
        # the views' gradient is bank[:view_end]'s, written by their bmm; the rest follows (padded to whole runs)
        g_bank = bank.new_empty(mm.view_end + adjoint_numel(mm.bank_grad, mm.bank_numel - mm.view_end,
                                                            bank.numel() - mm.view_end))
    g_a = bank.new_empty(mm.a_index.numel()) if need_coef else None
    start = t0 = a0 = 0
    for t, a, (n, r, k), v in zip(ts, as_, mm.shapes, mm.views):
        g = grad[start : start + n * r * c].view(n, r, c)
        if need_bank:
            dest = g_bank[v : v + n * k * c] if v is not None else g_t[t0 : t0 + n * k * c]
            torch.bmm(a.transpose(1, 2), g, out=dest.view(n, k, c))
            t0 += 0 if v is not None else n * k * c
        if need_coef:
            torch.bmm(g, t.transpose(1, 2), out=g_a[a0 : a0 + n * r * k].view(n, r, k))
        start, a0 = start + n * r * c, a0 + n * r * k
    gb = None
    if need_bank:
        for a, b in mm.gaps:
            g_bank[a:b].zero_()
        adjoint_of(mm.bank_grad, g_t, mm.bank_numel - mm.view_end, bank.numel() - mm.view_end,
                   out=g_bank[mm.view_end :])
        gb = g_bank[: bank.numel()]
    # scatter_add_, not index_add_: on CPU the latter is ~1.5x slower on 1-D and ~8x on rows (measured)
    gc = coefficients.new_zeros(coefficients.numel()).scatter_add_(0, mm.a_index, g_a) if need_coef else None
    return gb, gc


class _Matmul(torch.autograd.Function):
    """Flat output of every chunked bmm. Keeps the gathered templates for backward (the coefficient gradient
    needs them): gathering them again there cost ~1 ms of a ~19 ms digits generation, and the step's memory
    peak (in backward, where the slot gradients live) did not move (bench/bench_core.py, 0.64 both ways)."""

    @staticmethod
    def forward(ctx, bank: Tensor, coefficients: Tensor, mm: Matmuls) -> Tensor:
        ctx.mm = mm
        templates = gather_runs(mm.templates, bank[mm.view_end :])
        ctx.save_for_backward(bank, templates, coefficients)
        return _matmul_forward(mm, bank, templates, coefficients)

    @staticmethod
    def backward(ctx, grad: Tensor):
        bank, templates, coefficients = ctx.saved_tensors
        gb, gc = _matmul_backward(ctx.mm, bank, templates, coefficients, grad.contiguous(),
                                  *ctx.needs_input_grad[:2])
        return gb, gc, None

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

from .gather_adjoint import GatherAdjoint, adjoint_of, gather_adjoint
from .run_gather import RunGather, gather_runs, run_gather

CHUNKS = (512, 256, 128, 64, 32)  # candidate chunk sizes, largest first (entries; 32 floats = 128 bytes)
MAX_PADDING = 0.02  # largest chunk whose column padding adds at most this fraction of the matmul work
SCATTER = torch.int64  # index tensors also scattered with (scatter_add_ takes int64 only)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def row_class(rows: int) -> int:
    """Rows (coefficient sets) a matrix is padded to: exact up to 8 (a `halves` block of 3 sets has 6, and
    padding it to 8 cost more output than the halving saved), then the next power of two."""
    return rows if rows <= 8 else 1 << (rows - 1).bit_length()


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


@dataclass
class MatmulLayout:
    """Chunk size and (K, R) classes of every item, from the whole plan (subset programs keep them)."""

    chunk: int
    classes: list[tuple[int, int]]  # (K, R) of each class, in order
    members: list[list[Item]]  # items of each class, in order


def matmul_layout(items: list[Item]) -> MatmulLayout:
    chunk = chunk_size([it.size for it in items]) if items else CHUNKS[0]
    by: dict[tuple[int, int], list[Item]] = defaultdict(list)
    for it in items:
        by[(it.k, row_class(it.rows))].append(it)
    classes = sorted(by)
    return MatmulLayout(chunk, classes, [by[c] for c in classes])


@dataclass
class Matmuls:
    """The bmm part of a program: one class per (K, R), chunks of `chunk` columns."""

    chunk: int
    shapes: list[tuple[int, int, int]]  # per class (chunks n, R, K)
    templates: RunGather  # every template entry of every class (classes concatenated, [n, K, C] each) from the bank
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
        return sum(n * k * self.chunk for n, _, k in self.shapes)

    @property
    def flops(self) -> int:
        """FLOPs of the forward bmm (2 x multiply-adds, as torch.utils.flop_counter counts them)."""
        return sum(2 * n * r * k * self.chunk for n, r, k in self.shapes)

    def positions(self, key: int, row: int, entries: Tensor) -> Tensor:
        """Where entries `entries` of row `row` of item `key` are in the flat output."""
        first, rows = self.place[key]
        return first + (entries // self.chunk * rows + row) * self.chunk + entries % self.chunk


def build_matmuls(layout: MatmulLayout, keep) -> Matmuls:
    c = layout.chunk
    col = torch.arange(c)
    t_parts, real_parts, a_parts, shapes, place = [], [], [], [], {}
    bank_numel = max((it.offset + it.params for items in layout.members for it in items), default=0)
    out = 0
    for (k, r), items in zip(layout.classes, layout.members):
        items = [it for it in items if keep(it.key)]
        if not items:
            continue
        n = 0
        for it in items:
            nj = -(-it.size // c)
            pos = (torch.arange(nj).unsqueeze(1) * c + col).view(nj, 1, c)  # [nj, 1, C] entry in the window
            starts = torch.tensor(it.starts).view(1, k, 1)
            idx = it.offset + (starts + pos) % it.params  # [nj, K, C]
            t_parts.append(torch.where(pos < it.size, idx, it.offset).flatten())
            real_parts.append((pos < it.size).expand(nj, k, c).flatten())
            alpha = torch.tensor(it.coef, dtype=torch.long)
            if it.rows < r:  # padded rows read coefficient row 0: never read, zero gradient
                alpha = torch.cat((alpha, alpha[:1].expand(r - it.rows, k)))
            a_parts.append(alpha.unsqueeze(0).expand(nj, r, k).flatten())
            place[it.key] = (out + n * r * c, r)
            n += nj
        shapes.append((n, r, k))
        out += n * r * c

    def cat(parts, dtype=SCATTER):
        return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)

    t_index, real = cat(t_parts), cat(real_parts, torch.bool)
    # The template gather by runs: a chunk of a cyclic window is C consecutive bank entries unless the window
    # wraps inside it (on 2 CPU cores the entry-wise gather of the digits plan's templates took twice as long).
    templates = run_gather(t_index, c, bank_numel)
    return Matmuls(c, shapes, templates, cat(a_parts), place, out, gather_adjoint(t_index, real, bank_numel),
                   bank_numel)


def _operands(mm: Matmuls, templates: Tensor, coefficients: Tensor):
    """Per class the bmm operands (templates [n, K, C], alphas [n, R, K]) from the gathered templates and one
    gather of the coefficients."""
    alphas = coefficients.index_select(0, mm.a_index)
    t_sizes = [n * k * mm.chunk for n, _, k in mm.shapes]
    a_sizes = [n * r * k for n, r, k in mm.shapes]
    ts = [t.view(n, k, mm.chunk) for t, (n, _, k) in zip(templates.split(t_sizes), mm.shapes)]
    as_ = [a.view(n, r, k) for a, (n, r, k) in zip(alphas.split(a_sizes), mm.shapes)]
    return ts, as_


def _matmul_forward(mm: Matmuls, templates: Tensor, coefficients: Tensor) -> Tensor:
    out = templates.new_empty(mm.out_numel)
    ts, as_ = _operands(mm, templates, coefficients)
    start = 0
    for t, a, (n, r, _) in zip(ts, as_, mm.shapes):
        torch.bmm(a, t, out=out[start : start + n * r * mm.chunk].view(n, r, mm.chunk))
        start += n * r * mm.chunk
    return out


def _matmul_backward(mm: Matmuls, bank: Tensor, templates: Tensor, coefficients: Tensor, grad: Tensor,
                     need_bank: bool, need_coef: bool) -> tuple[Tensor | None, Tensor | None]:
    ts, as_ = _operands(mm, templates, coefficients)
    g_t = bank.new_empty(mm.t_numel + 1) if need_bank else None  # + the zero entry `adjoint_of` reads
    g_a = bank.new_empty(mm.a_index.numel()) if need_coef else None
    start = t0 = a0 = 0
    c = mm.chunk
    for t, a, (n, r, k) in zip(ts, as_, mm.shapes):
        g = grad[start : start + n * r * c].view(n, r, c)
        if need_bank:
            torch.bmm(a.transpose(1, 2), g, out=g_t[t0 : t0 + n * k * c].view(n, k, c))
        if need_coef:
            torch.bmm(g, t.transpose(1, 2), out=g_a[a0 : a0 + n * r * k].view(n, r, k))
        start, t0, a0 = start + n * r * c, t0 + n * k * c, a0 + n * r * k
    gb = adjoint_of(mm.bank_grad, g_t, mm.bank_numel, bank.numel()) if need_bank else None
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
        templates = gather_runs(mm.templates, bank)
        ctx.save_for_backward(bank, templates, coefficients)
        return _matmul_forward(mm, templates, coefficients)

    @staticmethod
    def backward(ctx, grad: Tensor):
        bank, templates, coefficients = ctx.saved_tensors
        gb, gc = _matmul_backward(ctx.mm, bank, templates, coefficients, grad.contiguous(),
                                  *ctx.needs_input_grad[:2])
        return gb, gc, None

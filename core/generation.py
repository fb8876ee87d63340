"""Batched weight generation: a number of kernels per step that does not grow with slots, cells or blocks.

DESIGN.md step 6 says "one matmul per block, then cells are assembled into slot weights". Done literally
(one matmul, one window stack, one concatenation per block and per slot, in Python) that is O(blocks +
slots x cells) tensor operations per step: ~7,000 aten calls for the digits plan, each a kernel launch on
a GPU. Here a *program* (pure index tensors, built once per plan, requested slot set and device) runs
the same arithmetic in a handful of kernels:

1. **Chunked matmuls.** Every block's product alpha_b [R_b, K_b] @ templates_b [K_b, size_b] is cut along
   its columns into chunks of `C` entries (C a power of two chosen per plan, padding < 2%): chunk j is
   alpha_b @ templates_b[:, jC:(j+1)C]. All chunks of all blocks with the same (K, R) class are one `bmm`
   [n, R, K] @ [n, K, C], so there is one bmm per (K, R) class (a handful, bounded by max_templates and
   the number of coefficient sets per block, never by slots or blocks). Templates of every class are one
   gather of the flat bank (index tensors carry the cyclic windows, wrap included); coefficients one
   gather of the flat coefficient vector (rows padded to the class's R read any coefficient: their output
   is never read, so their gradient is exactly zero).
2. **Assembly** (SuperWeights). A slot weight is a row-major concatenation of grid cells, so in the matmul
   output it is a sequence of runs of `u` entries, u = gcd(C, the cell row widths of its group) (a power of
   two). One row gather per distinct u (at most log2(C) + 1) copies the runs into one flat weight buffer;
   one in-place multiply per u applies each slot's fixed gain. Slot weights are views of that buffer.
   SSN wavg slots are blocks with R = 1 whose chunks are consecutive: the matmul output (times the gains)
   *is* their weight buffer, nothing to assemble; repeat and mask slots are one gather of the bank.
3. **Backward** in the same few kernels: one concatenation of the slot gradients, one multiply and one
   `scatter_add_` per u into the matmul-output gradient, two bmm per class, one `scatter_add_` into the bank
   gradient and one into the coefficient gradient.

Memory (issue 16 item 4). The matmul output is a temporary: the assembly's backward needs only indices,
so it is freed as soon as the slot weights are gathered; generated weights exist once, as the flat buffer
the slot weights view. Templates and coefficient matrices are not kept for backward either: they are
gathered again there (one gather each), so between forward and backward generation holds nothing but
the slot weights. The price is persistent index tensors (int32): one entry per template entry and one per
assembled run, built once per plan.

Bit-exactness. The layout (chunk size, classes, which block in which class) comes from the whole plan,
and a program for a subset of slots (a member-parallel worker's) only drops chunks, so each kept chunk is
the same bmm matrix at the same alignment: subset weights and gradients are bit for bit the full ones.
Metadata-only operations (one `as_strided` view per slot weight, one flattening view per slot gradient)
are the only per-slot aten calls left: they launch no kernel.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNKS = (512, 256, 128, 64, 32)  # candidate chunk sizes, largest first (entries; 32 floats = 128 bytes)
MAX_PADDING = 0.02  # largest chunk whose column padding adds at most this fraction of the matmul work
INDEX = torch.int32  # index tensors only gathered with: half the memory of int64
SCATTER = torch.int64  # index tensors also scattered with (scatter_add_ takes int64 only)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def row_class(rows: int) -> int:
    """Rows (coefficient sets) a matrix is padded to: exact up to 4, then the next power of two."""
    return rows if rows <= 4 else 1 << (rows - 1).bit_length()


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
    t_index: Tensor  # bank entry of every template entry, classes concatenated ([n, K, C] each)
    a_index: Tensor  # coefficient of every alpha entry, classes concatenated ([n, R, K] each)
    place: dict[int, tuple[int, int]]  # item key -> (first entry of its output in `out`, its R)
    out_numel: int

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
    t_parts, a_parts, shapes, place = [], [], [], {}
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
            alpha = torch.tensor(it.coef, dtype=torch.long)
            if it.rows < r:  # padded rows read coefficient row 0: never read, zero gradient
                alpha = torch.cat((alpha, alpha[:1].expand(r - it.rows, k)))
            a_parts.append(alpha.unsqueeze(0).expand(nj, r, k).flatten())
            place[it.key] = (out + n * r * c, r)
            n += nj
        shapes.append((n, r, k))
        out += n * r * c
    cat = (lambda ps: torch.cat(ps).to(SCATTER)) if t_parts else (lambda ps: torch.zeros(0, dtype=SCATTER))
    return Matmuls(c, shapes, cat(t_parts), cat(a_parts), place, out)


def _operands(mm: Matmuls, bank: Tensor, coefficients: Tensor):
    """Per class the bmm operands (templates [n, K, C], alphas [n, R, K]): one gather of each vector."""
    templates = bank.index_select(0, mm.t_index)
    alphas = coefficients.index_select(0, mm.a_index)
    t_sizes = [n * k * mm.chunk for n, _, k in mm.shapes]
    a_sizes = [n * r * k for n, r, k in mm.shapes]
    ts = [t.view(n, k, mm.chunk) for t, (n, _, k) in zip(templates.split(t_sizes), mm.shapes)]
    as_ = [a.view(n, r, k) for a, (n, r, k) in zip(alphas.split(a_sizes), mm.shapes)]
    return ts, as_


def _matmul_forward(mm: Matmuls, bank: Tensor, coefficients: Tensor) -> Tensor:
    out = bank.new_empty(mm.out_numel)
    ts, as_ = _operands(mm, bank, coefficients)
    start = 0
    for t, a, (n, r, _) in zip(ts, as_, mm.shapes):
        torch.bmm(a, t, out=out[start : start + n * r * mm.chunk].view(n, r, mm.chunk))
        start += n * r * mm.chunk
    return out


def _matmul_backward(mm: Matmuls, bank: Tensor, coefficients: Tensor, grad: Tensor, need_bank: bool,
                     need_coef: bool) -> tuple[Tensor | None, Tensor | None]:
    ts, as_ = _operands(mm, bank, coefficients)  # gathered again: cheaper than keeping them alive
    g_t = bank.new_empty(mm.t_index.numel()) if need_bank else None
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
    # scatter_add_, not index_add_: on CPU the latter is ~1.5x slower on 1-D and ~8x on rows (measured)
    gb = bank.new_zeros(bank.numel()).scatter_add_(0, mm.t_index, g_t) if need_bank else None
    gc = coefficients.new_zeros(coefficients.numel()).scatter_add_(0, mm.a_index, g_a) if need_coef else None
    return gb, gc


class _Matmul(torch.autograd.Function):
    """Flat output of every chunked bmm; saves nothing but the (non-generated) bank and coefficients."""

    @staticmethod
    def forward(ctx, bank: Tensor, coefficients: Tensor, mm: Matmuls) -> Tensor:
        ctx.mm = mm
        ctx.save_for_backward(bank, coefficients)
        return _matmul_forward(mm, bank, coefficients)

    @staticmethod
    def backward(ctx, grad: Tensor):
        bank, coefficients = ctx.saved_tensors
        gb, gc = _matmul_backward(ctx.mm, bank, coefficients, grad.contiguous(), *ctx.needs_input_grad[:2])
        return gb, gc, None


# -- views of flat buffers ------------------------------------------------------------------------


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


@dataclass
class Views:
    """Slot `slots[j]` is buffer[offsets[j] : offsets[j] + numel] viewed as shapes[j]."""

    slots: list[int]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    strides: list[tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self):
        self.strides = [_contiguous_strides(s) for s in self.shapes]

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
    for g, n, gap in zip(grads, sizes, gaps):
        parts.append(zeros[:n] if g is None else (g.view(-1) if g.is_contiguous() else g.reshape(-1)))
        if gap:
            parts.append(zeros[:gap])
    return torch.cat(parts)


# -- SuperWeights: assembly -----------------------------------------------------------------------


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
        if self.matmuls.t_index.device == device:
            return self
        hit = self._on.get(device)
        if hit is None:
            mm = replace(self.matmuls, t_index=self.matmuls.t_index.to(device), a_index=self.matmuls.a_index.to(device))
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


# -- SSN ------------------------------------------------------------------------------------------


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
            mm = replace(self.matmuls, t_index=self.matmuls.t_index.to(device), a_index=self.matmuls.a_index.to(device))
            hit = self._on[device] = replace(
                self, matmuls=mm, wavg_gain=self.wavg_gain.to(device), d_index=self.d_index.to(device),
                m_index=None if self.m_index is None else self.m_index.to(device),
                direct_slot=self.direct_slot.to(device),
                inter=[(g, s, ids, t.to(device)) for g, s, ids, t in self.inter], _on={})
        return hit


def ssn_program(plan, layout: MatmulLayout, slot_ids: list[int]) -> SSNProgram:
    """The program generating `slot_ids` (sorted, distinct)."""
    wanted = set(slot_ids)
    mm = build_matmuls(layout, wanted.__contains__)
    c = mm.chunk
    w_slots = sorted((i for i in slot_ids if plan.slot_layout[i].mode == "wavg"), key=lambda i: mm.place[i][0])
    w_offsets = [mm.place[i][0] for i in w_slots]
    wavg = Views(w_slots, [plan.slots[i].shape for i in w_slots], w_offsets)
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
    return SSNProgram(mm, wavg, wavg_gain.to(INDEX), Views(d_slots, [plan.slots[i].shape for i in d_slots], d_offsets),
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

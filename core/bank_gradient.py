"""The bank gradient from the template gradients, as gathers of runs in a few layers.

The adjoint of the template gather (`core.chunked_matmul`): every template entry reads one bank entry, so the
bank gradient is a sum over each entry's readers. One entry-wise `scatter_add_` of every template entry does
it, but on CPU that op runs on one thread; here the same sums, in the same order, are parallel row gathers
(`core.run_gather`). `bank_gradient` builds the index tensors once per program; `bank_gradient_of` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .run_gather import INDEX, RunGather, gather_runs, run_gather


@dataclass
class BankGradient:
    """The bank gradient from the template gradients: gathers by runs instead of one entry-wise scatter.

    Every bank entry is read by one or more template entries (its coverage: 1-2 at mid budgets, many when
    tiled at tiny ones). Layer l holds each entry's l-th reader (readers in template-entry order): layer 0 is
    one gather by runs straight into the gradient (every entry has a reader), layers 1.. are gathers by runs
    of the bank runs that have an l-th reader, added row-wise; the readers past the last layer (`LAYERS` at
    most; fewer where a layer would hold under `MIN_LAYER` of them, as in tiled banks) are one entry-wise
    `scatter_add_`. The same sums in the same order as a scatter_add_ of every template entry (bit for bit),
    but in parallel gathers: on 2 CPU cores the entry-wise scatter_add_ of the digits plan ran on one thread
    and took 3.1 ms of the ~20 ms of a generation forward + backward."""

    length: int  # bank entries per run
    first: RunGather  # layer 0: bank (padded to whole runs) <- template gradient
    more: list[tuple[RunGather, Tensor]]  # layers 1..: gathered runs and the bank runs they add into
    rest_to: Tensor  # readers past the last layer: their bank entries ...
    rest_from: Tensor  # ... and template entries

    def to(self, device) -> BankGradient:
        return replace(self, first=self.first.to(device), more=[(g.to(device), r.to(device)) for g, r in self.more],
                       rest_to=self.rest_to.to(device), rest_from=self.rest_from.to(device))

    def tensors(self) -> tuple[Tensor, ...]:
        return (*self.first.tensors(), *(t for g, r in self.more for t in (*g.tensors(), r)), self.rest_to,
                self.rest_from)


LAYERS = 4  # bank gradient layers gathered by runs at most; readers past them are scattered entry by entry
MIN_LAYER = 0.1  # a layer past the first is gathered only if it holds this fraction of the readers
RUNS = (128, 64, 32, 16)  # candidate bank-gradient run lengths, longest first
MAX_FIXES = 0.02  # longest run whose fixed entries stay under this fraction of the gathered entries


def bank_gradient(t_index: Tensor, real: Tensor, bank_numel: int) -> BankGradient:
    """Index tensors of the bank gradient: `t_index[i]` is the bank entry template entry i reads; only the
    `real` entries (not padding columns, whose gradient is zero) count. The template gradient it gathers
    from has one more entry, kept zero: the source of bank entries without an l-th reader."""
    zero = t_index.numel()  # the zero entry
    pos = real.nonzero().flatten()  # template entries that read the bank, in order
    dest = t_index[pos]
    total, layers = max(pos.numel(), 1), []
    while pos.numel() and len(layers) < LAYERS:  # layer l: each bank entry's first reader not in layers < l
        src = torch.full((bank_numel,), zero, dtype=torch.long).scatter_reduce_(0, dest, pos, "amin")
        took = src[dest] == pos
        if layers and int(took.sum()) < MIN_LAYER * total:  # tiled banks: each layer would hold too few
            break
        layers.append(src)
        keep = (~took).nonzero().flatten()  # (an index: boolean-mask indexing took seconds on big plans)
        pos, dest = pos[keep], dest[keep]  # the rest stays in template-entry order
    best = None
    for length in RUNS:
        n_runs = -(-bank_numel // length)
        plan = []
        for layer, src in enumerate(layers):
            padded = torch.cat((src, torch.full((n_runs * length - bank_numel,), zero, dtype=torch.long)))
            padded = padded.view(n_runs, length)
            rows = torch.arange(n_runs) if layer == 0 else (padded != zero).any(1).nonzero().flatten()
            plan.append((run_gather(padded[rows].flatten(), length, zero + 1, zero), rows))
        gathered = sum(g.numel for g, _ in plan) or 1
        fixes = sum(g.fix_at.numel() + g.entrywise.numel() for g, _ in plan)
        best = (length, plan)
        if fixes <= MAX_FIXES * gathered:
            break
    length, plan = best
    first = plan[0][0] if plan else run_gather(torch.zeros(0, dtype=torch.long), length, zero + 1)
    return BankGradient(length, first, [(g, rows.unsqueeze(1)) for g, rows in plan[1:]], dest, pos.to(INDEX))


def bank_gradient_of(bg: BankGradient, g_t: Tensor, read: int, total: int) -> Tensor:
    """The gradient of a bank of `total` entries (the first `read` read by templates) from `g_t` (template
    gradient; its last entry is the zero entry)."""
    g_t[-1:].zero_()
    n_runs = -(-read // bg.length)
    gb = g_t.new_empty(max(n_runs * bg.length, total))
    gather_runs(bg.first, g_t, out=gb[: n_runs * bg.length])
    if gb.numel() > n_runs * bg.length:
        gb[n_runs * bg.length :].zero_()  # entries no template reads (an SSN bank's repeat / mask groups)
    rows = gb[: n_runs * bg.length].view(n_runs, bg.length)
    for g, at in bg.more:
        # scatter_add_ with an expanded index: the parallel sorted path (~8x faster than index_add_ on rows)
        rows.scatter_add_(0, at.expand(-1, bg.length), gather_runs(g, g_t).view(-1, bg.length))
    if bg.rest_to.numel():
        gb.scatter_add_(0, bg.rest_to, g_t.index_select(0, bg.rest_from))
    return gb[:total]

"""The adjoint of a gather (`out[i] = src[index[i]]`), as gathers of runs in a few layers.

The templates read the bank (`core.chunked_matmul`), so backward needs this gather's adjoint: the bank gradient
from the template gradients. (The SuperWeight slot assembly's adjoint is an `embedding_bag` instead,
`core.superweight_program`: its gathers are whole aligned rows, which the bank's windows are not.)
Every entry of the gradient is a sum over the gathered entries that read it. One entry-wise `scatter_add_` of
every gathered entry does it, but on CPU that op runs on one thread; here the same sums, in the same order, are
parallel row gathers (`core.run_gather`). `gather_adjoint` builds the index tensors once per program;
`adjoint_of` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .run_gather import INDEX, MAX_FIXES, RUNS, RunGather, gather_runs, run_gather


@dataclass
class GatherAdjoint:
    """The gradient of a gather's source from the gradient of its output: gathers by runs instead of one
    entry-wise scatter. Written for the bank (source) and the templates (output); the same for any gather.

    Every bank entry is read by one or more template entries (its coverage: 1-2 at mid budgets, many when
    tiled at tiny ones). Layer l holds each entry's l-th reader (readers in template-entry order): layer 0 is
    one gather by runs straight into the gradient (entries without a reader read the zero entry: no zero
    fill), layers 1.. are gathers by runs of the bank runs that have an l-th reader, added row-wise; the
    readers past the last layer (`LAYERS` at most; fewer where a layer would hold under `MIN_LAYER` of them, as
    in tiled banks) are one entry-wise `scatter_add_`. The same sums in the same order as a scatter_add_ of
    every template entry (bit for bit), but in parallel gathers: on 2 CPU cores the entry-wise scatter_add_ of
    the digits plan ran on one thread and took 3.1 ms of the ~20 ms of a generation forward + backward."""

    length: int  # source entries per run
    first: RunGather  # layer 0: source gradient (padded to whole runs) <- output gradient
    more: list[tuple[RunGather, Tensor]]  # layers 1..: gathered runs and the source runs they add into
    rest_to: Tensor  # readers past the last layer: their source entries ...
    rest_from: Tensor  # ... and output entries

    def to(self, device) -> GatherAdjoint:
        return replace(self, first=self.first.to(device), more=[(g.to(device), r.to(device)) for g, r in self.more],
                       rest_to=self.rest_to.to(device), rest_from=self.rest_from.to(device))

    def tensors(self) -> tuple[Tensor, ...]:
        return (*self.first.tensors(), *(t for g, r in self.more for t in (*g.tensors(), r)), self.rest_to,
                self.rest_from)


LAYERS = 4  # layers gathered by runs at most; readers past them are scattered entry by entry
MIN_LAYER = 0.05  # a layer past the first is gathered only if it holds this fraction of the readers


def gather_adjoint(index: Tensor, real: Tensor, src_numel: int) -> GatherAdjoint:
    """Index tensors of the adjoint of `out = src[index]`: `index[i]` is the source entry output entry i reads;
    only the `real` entries count (not padding columns, whose gradient is zero). The output gradient it gathers
    from has one more entry, kept zero: the source of entries without an l-th reader."""
    zero = index.numel()  # the zero entry
    pos = real.nonzero().flatten()  # output entries that read the source, in order
    dest = index[pos]
    total, layers = max(pos.numel(), 1), []
    while pos.numel() and len(layers) < LAYERS:  # layer l: each source entry's first reader not in layers < l
        src = torch.full((src_numel,), zero, dtype=torch.long).scatter_reduce_(0, dest, pos, "amin")
        took = src[dest] == pos
        if layers and int(took.sum()) < MIN_LAYER * total:  # tiled banks: each layer would hold too few
            break
        layers.append(src)
        keep = (~took).nonzero().flatten()  # (an index: boolean-mask indexing took seconds on big plans)
        pos, dest = pos[keep], dest[keep]  # the rest stays in output-entry order
    best = None
    for length in RUNS:
        n_runs = -(-src_numel // length)
        plan = []
        for layer, src in enumerate(layers):
            padded = torch.cat((src, torch.full((n_runs * length - src_numel,), zero, dtype=torch.long)))
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
    return GatherAdjoint(length, first, [(g, rows.unsqueeze(1)) for g, rows in plan[1:]], dest, pos.to(INDEX))


def adjoint_numel(adj: GatherAdjoint, read: int, total: int) -> int:
    """Entries `adjoint_of` writes: the source's, padded to whole runs."""
    return max(-(-read // adj.length) * adj.length, total)


def adjoint_of(adj: GatherAdjoint, g_out: Tensor, read: int, total: int, out: Tensor | None = None) -> Tensor:
    """The gradient of a source of `total` entries (the first `read` ones gathered from) from `g_out` (the
    output's gradient; its last entry is the zero entry, zeroed here), written into `out` (`adjoint_numel`
    entries) or a new tensor."""
    g_out[-1:].zero_()
    n_runs = -(-read // adj.length)
    g_src = g_out.new_empty(adjoint_numel(adj, read, total)) if out is None else out
    gather_runs(adj.first, g_out, out=g_src[: n_runs * adj.length])
    if g_src.numel() > n_runs * adj.length:
        g_src[n_runs * adj.length :].zero_()  # entries nothing reads (an SSN bank's repeat / mask groups)
    rows = g_src[: n_runs * adj.length].view(n_runs, adj.length)
    for g, at in adj.more:
        # scatter_add_ with an expanded index: the parallel sorted path (~8x faster than index_add_ on rows)
        rows.scatter_add_(0, at.expand(-1, adj.length), gather_runs(g, g_out).view(-1, adj.length))
    if adj.rest_to.numel():
        g_src.scatter_add_(0, adj.rest_to, g_out.index_select(0, adj.rest_from))
    return g_src[:total]

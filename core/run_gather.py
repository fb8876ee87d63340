"""Gathers by runs: `src[index]` done as one row gather of `length`-entry runs plus a few entries fixed.

Generation moves millions of floats whose source positions come in long runs of consecutive entries (a
template's chunk is C consecutive bank entries; a bank entry's gradient comes from a template's consecutive
gradient entries). An entry-wise `index_select` reads an int64 index per float and on CPU runs on one thread;
a gather of rows of an overlapping strided view of the source (metadata only) reads one int32 per `length`
floats and runs in parallel. The few output entries a row gets wrong (the run broke inside it: a window
wrapped, a block or layer ended, padding) are gathered again one by one. Bit for bit `src[index]`.

`index` may hold `src.numel()`-style sentinels: callers that need "no source" point it at an entry they keep
zero (`core.chunked_matmul`'s bank gradient keeps one zero entry at the end of its source).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

INDEX = torch.int32  # gathered with only: half the memory of int64
FIELDS = ("starts", "fix_at", "fix_from", "entrywise")
RUNS = (128, 64, 32, 16)  # candidate run (row) lengths where the caller may choose, longest first
MAX_FIXES = 0.02  # the longest run whose fixed entries stay under this fraction of the gathered entries


@dataclass
class RunGather:
    """out = src[index] for an index of `starts.numel() * length` entries (or `entrywise` when src is short)."""

    length: int
    starts: Tensor  # src entry where each run of `length` output entries starts
    fix_at: Tensor  # int64: the output entries their run gets wrong ...
    fix_from: Tensor  # ... and the src entries they are
    entrywise: Tensor  # the whole index when src is shorter than one run (then the rest is empty)

    def to(self, device) -> RunGather:
        return replace(self, **{f: getattr(self, f).to(device) for f in FIELDS})

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f) for f in FIELDS)

    @property
    def numel(self) -> int:
        return self.entrywise.numel() or self.starts.numel() * self.length


def run_gather(index: Tensor, length: int, src_numel: int, sentinel: int | None = None) -> RunGather:
    """The runs of `index` (int64, a multiple of `length` entries; `sentinel`: entries that point nowhere in
    particular, never chosen as a run's start)."""
    empty = torch.zeros(0, dtype=torch.long)
    if src_numel < length:
        return RunGather(length, empty.to(INDEX), empty, empty.to(INDEX), index.to(INDEX))
    rows = index.view(-1, length)
    if sentinel is None:
        starts = rows[:, 0]
    else:  # the start the row's first real entry asks for
        first = (rows != sentinel).to(torch.uint8).argmax(dim=1, keepdim=True)
        starts = rows.gather(1, first).squeeze(1) - first.squeeze(1)
    starts = starts.clamp(0, src_numel - length)
    wrong = (rows != starts.unsqueeze(1) + torch.arange(length)).flatten().nonzero().flatten()
    return RunGather(length, starts.to(INDEX), wrong, index[wrong].to(INDEX), empty.to(INDEX))


def gather_runs(g: RunGather, src: Tensor, out: Tensor | None = None) -> Tensor:
    """src[index] (1-D, contiguous src) into `out` (1-D, `g.numel` entries) or a new tensor."""
    if g.entrywise.numel() or src.numel() < g.length:  # (src shorter than a run: `entrywise` is the whole index)
        return torch.index_select(src, 0, g.entrywise, **({} if out is None else {"out": out}))
    runs = src.as_strided((src.numel() - g.length + 1, g.length), (1, 1))
    if out is None:
        res = runs.index_select(0, g.starts).view(-1)
    else:
        res = out
        torch.index_select(runs, 0, g.starts, out=out.view(-1, g.length))
    if g.fix_at.numel():
        res.index_copy_(0, g.fix_at, src.index_select(0, g.fix_from))
    return res

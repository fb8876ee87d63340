"""The per-block, per-slot generation that `core.generation` replaced, kept as the reference it is tested
(and benchmarked) against: same plan, same parameters -> the same slot weights (to rounding) and gradients.

It issues O(blocks x templates + slots x cells) small tensor operations per step (each a kernel launch on a
GPU); `core.generation` issues a number that does not grow with slots or cells. Nothing in training uses it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .windows import cyclic, cyclic_windows

_ALIGN = 128


class ReferenceGenerator:
    """Old generation of a `SuperWeightBank` or an `SSNBank` (reads its plan, bank, coefficients, gains).

    Index structures are built once, as the old banks did, so timing it measures the old per-step cost."""

    def __init__(self, bank):
        self.bank = bank
        plan = bank.plan
        self.ssn = getattr(plan, "method", "superweights") == "ssn"
        self._subsets: dict = {}
        if self.ssn:
            self._group_sizes = [g.params for g in plan.groups]
            self._coef_sizes = [lay.coef_count for lay in plan.slot_layout]
            self._chains = []
            for g in plan.groups:
                wavg = [i for i in g.slots if plan.slot_layout[i].mode == "wavg"]
                lengths = [plan.slot_layout[i].templates * plan.slots[i].numel for i in wavg]
                starts = [sum(lengths[:j]) for j in range(len(lengths) + 1)]
                self._chains.append((wavg, lengths, starts))
            self._position = {i: j for wavg, _, _ in self._chains for j, i in enumerate(wavg)}
            self._all = [list(g.slots) for g in plan.groups]
        else:
            self._row_of = [{c: r for r, c in enumerate(b.coef_sets)} for b in plan.blocks]
            self._cells = [plan.slot_cells(i) for i in range(len(plan.slots))]
            self._param_sizes = [b.params for b in plan.blocks]
            self._coef_sizes = [len(b.coef_sets) * b.templates for b in plan.blocks]
            self._slot_blocks = [sorted({bid for row in cells for bid in row}) for cells in self._cells]

    def __call__(self, slots: Iterable[int] | None = None) -> list[Tensor | None]:
        gains = self.bank.gains
        return [None if w is None else w * gains[i] for i, w in enumerate(self.raw_weights(slots))]

    def raw_weights(self, slots: Iterable[int] | None = None) -> list[Tensor | None]:
        return self._ssn_raw(slots) if self.ssn else self._sw_raw(slots)

    # -- SuperWeights ------------------------------------------------------------------------------
    def _sw_subset(self, slots):
        key = tuple(slots)
        hit = self._subsets.get(key)
        if hit is None:
            ids = sorted(set(key))
            hit = self._subsets[key] = (ids, sorted({b for i in ids for b in self._slot_blocks[i]}))
        return hit

    def _sw_block_outputs(self, blocks):
        bank = self.bank
        thetas = torch.split(bank.logical(), self._param_sizes)  # (the bank's own order: `core.bank_storage`)
        alphas = torch.split(bank.coefficients, self._coef_sizes)
        plan_blocks = bank.plan.blocks
        out: list = [None] * len(plan_blocks)
        for bid in range(len(plan_blocks)) if blocks is None else blocks:
            b = plan_blocks[bid]
            windows = cyclic_windows(thetas[bid], b.window_starts(), b.size)
            out[bid] = (alphas[bid].view(len(b.coef_sets), b.templates) @ windows).unbind(0)
        return out

    def _sw_raw(self, slots):
        plan = self.bank.plan
        if slots is None:
            ids, outputs = range(len(plan.slots)), self._sw_block_outputs(None)
        else:
            ids, block_ids = self._sw_subset(slots)
            outputs = self._sw_block_outputs(block_ids)
        raw: list[Tensor | None] = [None] * len(plan.slots)
        for i in ids:
            coef = plan.slot_coef[i]
            bands = []
            for row in self._cells[i]:
                cells = [self._cell(outputs[bid][self._row_of[bid][coef]], plan.blocks[bid].shape) for bid in row]
                bands.append(cells[0] if len(cells) == 1 else torch.cat(cells, dim=1))
            raw[i] = bands[0] if len(bands) == 1 else torch.cat(bands, dim=0)
        return raw

    def _cell(self, product: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A block's product as its weight cell: row-major, or in a channels_last bank read as [Ob, kh, kw, Ib]."""
        if len(shape) == 4 and int(self.bank.channels_last):
            return product.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
        return product.view(shape)

    # -- SSN ---------------------------------------------------------------------------------------
    @staticmethod
    def _tiling(theta: Tensor, starts: list[int], a: int, z: int) -> Tensor:
        lo, hi, total = starts[a], starts[z], starts[-1]
        if (lo == 0 and hi == total) or total <= theta.numel():
            return cyclic(theta, lo, hi - lo)
        base = lo - lo % _ALIGN
        return cyclic(theta, base, hi - base).clone()[lo - base :]

    def _ssn_raw(self, slots):
        from .ssn import inter_upsample

        bank = self.bank
        plan = bank.plan
        thetas = torch.split(bank.bank, self._group_sizes)
        coefs = torch.split(bank.coefficients, self._coef_sizes)
        raw: list[Tensor | None] = [None] * len(plan.slots)
        if slots is None:
            per_group = self._all
        else:
            wanted = set(slots)
            per_group = [[i for i in g.slots if i in wanted] for g in plan.groups]
        for g, theta, ids, (wavg, lengths, starts) in zip(plan.groups, thetas, per_group, self._chains):
            if not ids:
                continue
            p = g.params
            if plan.layout == "chained":
                pos = [self._position[i] for i in ids if plan.slot_layout[i].mode == "wavg"]
                if pos:
                    a, z = pos[0], pos[-1] + 1
                    regions = dict(zip(wavg[a:z], torch.split(self._tiling(theta, starts, a, z), lengths[a:z])))
            for i in ids:
                spec, lay = plan.slots[i], plan.slot_layout[i]
                s = spec.numel
                if lay.mode == "wavg":
                    if plan.layout == "chained":
                        windows = regions[i].view(lay.templates, s)
                    else:
                        windows = torch.stack([cyclic(theta, k * p // lay.templates, s) for k in range(lay.templates)])
                    w = coefs[i] @ windows
                elif lay.mode == "repeat":
                    w = cyclic(theta, lay.phase, s)
                elif lay.mode == "mask":
                    w = torch.cat((theta, cyclic(theta, 0, s - p) * coefs[i]))
                else:
                    w = inter_upsample(cyclic(theta, lay.phase, lay.grid[0] * lay.grid[1]).view(lay.grid), spec.shape)
                raw[i] = w.view(spec.shape) if lay.mode == "inter" else self._cell(w, spec.shape)
        return raw

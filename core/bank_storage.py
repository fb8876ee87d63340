"""The order the SuperWeight bank's entries are stored in: that of the matmuls' operands, read in place.

A block's parameters theta_b are one segment of the bank (`core.plan` gives its offset) and template k is a
cyclic window of theta_b (DESIGN.md step 4): that is the bank's *logical* order, the one the plan, the
reference generation and `SuperWeightBank.theta` speak. For a `direct` block (P_b = K_b size_b, windows at
k size_b: most blocks at most budgets; on the digits members' plan at 0.5, 28 of 43, 79% of the bank) the
chunked matmul's operand [chunks, K, C] is a permutation of theta_b that reads each entry once. The Parameter
stores the bank in *storage* order: the direct classes' items one after another from its start, each as its
operand [chunks, K, C]; then every other entry, in logical order. Those classes' operands are then views of
the bank (no gather of ~8 MB of templates per digits step) and their bmm writes the bank gradient in place (no
gather back). Elementwise things (SGD, weight decay, allreduce, NaN checks) do not see the order.

The order is chosen when a bank is made, from its plan, and kept with its weights: `storage_code` is a small
buffer (each block's rank in the order or -1; then the chunk) saved in every checkpoint, so a bank and its
optimizer state are read back in the order they were written, whatever a later plan would choose. Unsharing
changes the classes: `SuperWeightBank.restore` then moves the bank and its momentum to the new plan's order
(a class whose items are not consecutive in storage is gathered, as before).
A checkpoint without it (written before this order existed) is in logical order: `LOGICAL`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .chunked_matmul import Item, MatmulLayout, direct


@dataclass(frozen=True)
class Storage:
    keys: tuple[int, ...]  # the items stored as their operands, in order from the bank's start
    rank: dict[int, int]  # item key -> its place in `keys`
    segments: dict[int, tuple[int, int, int]]  # every item key -> (storage start, params, K if stored else 0)
    chunk: int

    def at(self, key: int, offset: int, index: Tensor) -> Tensor:
        """Storage positions of an item's logical entries `index` (absolute; the item starts at `offset`)."""
        start, params, k = self.segments[key]
        rel = index - offset
        if not k:
            return start + rel
        size = params // k
        return start + ((rel % size) // self.chunk * k + rel // size) * self.chunk + rel % self.chunk

    def theta(self, bank: Tensor, key: int) -> Tensor:
        """An item's parameters in logical order: a slice, or the transposed view of its stored operand
        [chunks, K, C] (a copy; differentiable)."""
        start, params, _ = self.segments[key]
        return self._unstore(bank[start : start + params], key)

    def logical(self, bank: Tensor, keys: list[int]) -> Tensor:
        """The parameters of items `keys` (every item, in logical order) concatenated: the bank in logical order.
        One split of the bank, so that backward is one concatenation (slicing per item would zero-fill a
        bank-sized gradient per item)."""
        order = sorted(keys, key=lambda key: self.segments[key][0])
        pieces = dict(zip(order, torch.split(bank, [self.segments[key][1] for key in order])))
        return torch.cat([self._unstore(pieces[key], key) for key in keys])

    def _unstore(self, flat: Tensor, key: int) -> Tensor:
        _, params, k = self.segments[key]
        return flat if not k else flat.view(-1, k, self.chunk).transpose(0, 1).reshape(params)

    def store(self, bank: Tensor, key: int, theta: Tensor) -> None:
        """Write an item's parameters (logical order) into the bank (storage order), in place."""
        start, params, k = self.segments[key]
        dest = bank[start : start + params]
        if k:
            dest.view(-1, k, self.chunk).copy_(theta.view(k, -1, self.chunk).transpose(0, 1))
        else:
            dest.copy_(theta)


LOGICAL = -2  # last entry of a code for the logical order (no chunk: nothing stored as an operand)


def storage_code(layout: MatmulLayout, n_keys: int) -> Tensor:
    """The code of the order a new bank is stored in: every direct class's items, class by class."""
    code = torch.full((n_keys + 1,), -1, dtype=torch.long)
    keys = [it.key for items, d in zip(layout.members, layout.direct) if d for it in items]
    code[keys] = torch.arange(len(keys))
    code[-1] = layout.chunk
    return code


def logical_code(n_keys: int) -> Tensor:
    code = torch.full((n_keys + 1,), -1, dtype=torch.long)
    code[-1] = LOGICAL
    return code


def with_legacy_storage(state: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """A saved state dict with what a bank saved before the storage order (and channels_last banks) existed would
    have had: logical order, row-major cells (`SuperWeightBank` loads such weights the same way)."""
    legacy = {"storage": lambda v: logical_code(v.numel() - 1), "channels_last": lambda v: torch.zeros_like(v)}
    return {**state, **{k: legacy[name](v) for k, v in expected.items()
                        if (name := k.rpartition(".")[2]) in legacy and k not in state
                        and k.rpartition(".")[0] + ".bank" in state}}


def storage_of(code: Tensor, items: list[Item], chunk: int, numel: int) -> Storage:
    """The order a code names, for a bank of these items; ValueError (one line) if it names none."""
    code = code.tolist()
    if len(code) != len(items) + 1:
        raise ValueError(f"bank.storage has {len(code)} entries, the plan's {len(items)} blocks need {len(items) + 1}")
    ranked = sorted(((r, it) for r, it in zip(code, items) if r >= 0), key=lambda t: t[0])  # (ties: tampered)
    if code[-1] == LOGICAL and ranked:
        raise ValueError("bank.storage says logical order but stores blocks as operands")
    if code[-1] not in (LOGICAL, chunk):
        raise ValueError(f"bank.storage names chunks of {code[-1]} entries, the plan's are {chunk}")
    if [r for r, _ in ranked] != list(range(len(ranked))) or any(r < -1 for r in code[:-1]):
        raise ValueError("bank.storage does not rank the blocks 0, 1, 2, ...: not a storage order")
    bad = [it.key for _, it in ranked if not direct(it, chunk)]
    if bad:
        raise ValueError(f"bank.storage stores block {bad[0]} as an operand, but its templates are not disjoint slices of whole chunks")
    start, at = {}, 0
    for _, it in ranked:
        start[it.key], at = at, at + it.params
    segments = {}
    for it in sorted(items, key=lambda it: it.offset):  # the others follow, in logical order
        if it.key in start:
            segments[it.key] = (start[it.key], it.params, it.k)
        else:
            segments[it.key], at = (at, it.params, 0), at + it.params
    if at != numel:
        raise ValueError(f"the plan's blocks hold {at} bank entries, the bank has {numel}")
    keys = tuple(it.key for _, it in ranked)
    return Storage(keys, {k: r for r, k in enumerate(keys)}, segments, chunk)

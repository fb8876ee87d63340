"""The SuperWeight bank: trainable templates + coefficients that generate every slot weight.

DESIGN.md steps 4-6. One flat `bank` vector holds theta_b of every block (exactly `plan.budget`
entries); one flat `coefficients` vector holds alpha_b (coefficient sets x templates) of every block.
Generation is one matmul per block (batched: one bmm per (templates, rows) class of all blocks' column
chunks, `core.generation`), then grid cells are assembled into slot weights by one gather; slots sharing a
coefficient set are assembled from the same cells, which is exactly the "no warping" property: a thin
member's weight is the top-left block of a wide one's. `core.reference` keeps the per-block, per-slot
generation it replaced (same weights and gradients to rounding; tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .bank_storage import Storage, logical_code, storage_code, storage_of
from .generation import SWProgram, matmul_layout, run_superweights, sw_items, sw_program, sw_rows
from .plan import Plan, SlotSpec
from .windows import cyclic_windows


class SuperWeightBank(nn.Module):
    def __init__(self, plan: Plan, generator: torch.Generator | None = None, channels_last: bool = False):
        """`channels_last`: a bank for convolutions that run in channels_last memory format (`train.channels_last`):
        its cells are read as [Ob, kh, kw, Ib] and its conv weights generated as channels_last tensors, so no
        convolution converts its weight (or its weight's gradient) each step. Another fixed map from template
        products to weight entries, so another model of the same distribution, chosen here and saved with the
        weights (the buffer `channels_last`); it changes no count, no budget, no init std."""
        super().__init__()
        self.plan = plan
        self.bank = nn.Parameter(torch.empty(plan.budget))
        self.coefficients = nn.Parameter(torch.empty(plan.coefficient_params))
        # Fixed (not trained) per-slot gains: composed weight gets exactly its slot's init std (SlotSpec.init_std).
        self.register_buffer("gains", torch.ones(len(plan.slots)))
        self.register_buffer("channels_last", torch.tensor(int(channels_last)))
        self._build_index()
        # The order the bank is stored in (`core.bank_storage`): chosen here, then kept with the weights.
        self.register_buffer("storage", storage_code(self._layout, len(plan.blocks)))
        self.reset_parameters(generator)

    def rebind(self, plan: Plan, coefficients: Tensor) -> None:
        """Switch to a plan with the same blocks but other coefficient sets (unsharing).

        The bank vector and gains are kept; `coefficients` is the new flat coefficient Parameter.
        """
        if [b.params for b in plan.blocks] != self._param_sizes or coefficients.numel() != plan.coefficient_params:
            raise ValueError("rebind needs the same blocks and a coefficient vector of the new plan's size")
        self.plan = plan
        self.coefficients = coefficients
        self._build_index()

    @torch.no_grad()
    def restore(self, *states: Tensor) -> bool:
        """Store the bank in the order this plan's matmuls read it (`storage_code`), moving every entry and the
        same entry of each of `states` (bank-shaped tensors kept in the bank's order: the optimizer's momentum), in
        place. For after `rebind`: unsharing changes the classes, and a class whose blocks are no longer
        consecutive in storage is gathered (on digits, fully unshared: 1 of 13 classes read in place, 8 after
        this). The logical bank (`theta`, `logical`) does not change. Returns whether anything moved."""
        code = storage_code(self._layout, len(self.plan.blocks)).to(self.storage.device)
        if torch.equal(code, self.storage):
            return False
        new = storage_of(code, self._items, self._layout.chunk, self.plan.budget)
        ids = [b.id for b in self.plan.blocks]
        position = torch.arange(self.bank.numel(), device=self.bank.device)
        # entry i of the new storage is entry perm[i] of the old: both at the same logical place
        perm = torch.empty_like(position)
        perm[new.logical(position, ids)] = self._storage().logical(position, ids)
        for t in (self.bank, *states):
            t.copy_(t[perm])
        self.storage.copy_(code)
        self._store, self._programs = None, {}
        return True

    # -- static index structures (pure python, computed once) --------------------------------
    def _build_index(self) -> None:
        plan = self.plan
        self._row_of = [{c: r for r, c in enumerate(b.coef_sets)} for b in plan.blocks]
        self._cells = [plan.slot_cells(i) for i in range(len(plan.slots))]
        self._param_sizes = [b.params for b in plan.blocks]
        self._coef_sizes = [len(b.coef_sets) * b.templates for b in plan.blocks]
        # Blocks each slot reads, and (per distinct requested slot set) the slots and blocks to generate:
        # a member-parallel worker asks for the same set every step, so this is one dict lookup.
        self._slot_blocks = [sorted({bid for row in cells for bid in row}) for cells in self._cells]
        self._subsets: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        # Generation programs (index tensors, `core.generation`): the layout comes from the whole plan so a
        # subset program computes exactly the full one's values; one program per requested slot set.
        self._items = sw_items(plan)
        self._layout = matmul_layout(self._items, split_direct=True)
        self._programs: dict[tuple[int, ...] | None, SWProgram | None] = {}
        self._rows: int | None = None  # the programs' row unit, from the whole plan
        self._store: Storage | None = None  # decoded `storage` (after loading weights: theirs)

    def _storage(self) -> Storage:
        if self._store is None:
            self._store = storage_of(self.storage, self._items, self._layout.chunk, self.plan.budget)
        return self._store

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # weights saved before the storage order existed are in logical order
        state_dict.setdefault(prefix + "storage", logical_code(len(self.plan.blocks)))
        load_channels_last(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._store, self._programs, self._rows = None, {}, None
        try:
            self._storage()
        except ValueError as e:
            error_msgs.append(str(e))

    def logical(self) -> Tensor:
        """The bank in logical order (`core.bank_storage`): theta of every block at its plan offset. A copy
        (differentiable): for the reference generation and tests, not for training steps."""
        return self._storage().logical(self.bank, [b.id for b in self.plan.blocks]) if self.plan.blocks else self.bank

    def theta(self, block_id: int) -> Tensor:
        """theta_b of a block, in logical order (differentiable; a copy where it is stored as an operand)."""
        return self._storage().theta(self.bank, block_id)

    def _subset(self, slots: Iterable[int]) -> tuple[list[int], list[int]]:
        """(sorted distinct slot ids, sorted ids of the blocks they read) of a requested slot set."""
        key = tuple(slots)
        hit = self._subsets.get(key)
        if hit is None:
            ids = sorted(set(key))
            if ids and not 0 <= ids[0] <= ids[-1] < len(self.plan.slots):
                raise IndexError(f"slot ids must be in [0, {len(self.plan.slots)}), got {key}")
            hit = self._subsets[key] = (ids, sorted({b for i in ids for b in self._slot_blocks[i]}))
        return hit

    # -- generation --------------------------------------------------------------------------
    def _program(self, slots: Iterable[int] | None) -> SWProgram | None:
        key = None if slots is None else tuple(slots)
        hit = self._programs.get(key, False)
        if hit is False:
            ids = list(range(len(self.plan.slots))) if key is None else self._subset(key)[0]
            cl = bool(self.channels_last)
            if ids and self._rows is None:
                self._rows = sw_rows(self.plan, self._layout, cl)
            hit = self._programs[key] = (sw_program(self.plan, self._layout, ids, self._rows, self._storage(), cl)
                                         if ids else None)
        return None if hit is None else hit.to(self.bank.device)

    def templates(self, block_id: int) -> Tensor:
        """[K_b, size_b]: template k = cyclic window of theta_b starting at k * P_b / K_b."""
        b = self.plan.blocks[block_id]
        return cyclic_windows(self.theta(block_id), b.window_starts(), b.size)

    def block_coefficients(self, block_id: int) -> Tensor:
        b = self.plan.blocks[block_id]
        n = len(b.coef_sets) * b.templates
        return self.coefficients[b.coef_offset : b.coef_offset + n].view(len(b.coef_sets), b.templates)

    def _generate(self, slots: Iterable[int] | None, gains: Tensor | None) -> list[Tensor | None]:
        program = self._program(slots)
        if program is None:
            return [None] * len(self.plan.slots)
        return run_superweights(program, self.bank, self.coefficients, gains, len(self.plan.slots))

    def raw_weights(self, slots: Iterable[int] | None = None) -> list[Tensor | None]:
        """Slot weights before the fixed gain, in plan slot order.

        A slot is the concatenation of its grid cells [:O, :I]; a thin slot sharing coefficients with a
        wide one is therefore bit for bit the top-left crop of it (no warping). `slots` (plan slot ids):
        generate only those, computing only the blocks they read; the other entries are None.
        """
        return self._generate(slots, None)

    def forward(self, slots: Iterable[int] | None = None) -> list[Tensor | None]:
        """Slot weights in plan slot order (one regeneration per training step): every slot, or only `slots`
        (plan slot ids; None elsewhere), e.g. a member-parallel worker's own members'. Each slot weight is a
        view of one flat buffer (the fixed gains already applied), the only copy of the generated weights."""
        return self._generate(slots, self.gains)

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Templates ~ N(0, c_b^2) (c_b: `template_scales`); orthogonal unit-norm coefficient rows; init gains
        measured on the result."""
        users: list[list[int]] = [[] for _ in self.plan.blocks]
        for i, cells in enumerate(self._cells):
            for bid in {bid for row in cells for bid in row}:
                users[bid].append(i)
        theta = torch.empty(self.bank.numel()).normal_(0.0, 1.0, generator=generator)  # logical order
        scale_segments(theta, self._param_sizes, template_scales(self.plan.slots, users))
        for b, segment in zip(self.plan.blocks, torch.split(theta, self._param_sizes)):
            self._storage().store(self.bank, b.id, segment)
        for b in self.plan.blocks:
            alpha = torch.empty(len(b.coef_sets), b.templates)
            nn.init.orthogonal_(alpha, generator=generator)
            alpha /= alpha.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.block_coefficients(b.id).copy_(alpha)
        self.gains.fill_(1.0)
        self.gains.copy_(init_gains(self.plan.slots, self.raw_weights()))


def load_channels_last(bank: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """`nn.Module._load_from_state_dict` for a bank with a `channels_last` buffer (both bank kinds): weights saved
    before such banks existed are row-major (0); a value other than 0 or 1 is a one-line error."""
    state_dict.setdefault(prefix + "channels_last", torch.tensor(0))
    nn.Module._load_from_state_dict(bank, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                    error_msgs)
    if int(bank.channels_last) not in (0, 1):
        error_msgs.append(f"bank.channels_last must be 0 or 1, got {int(bank.channels_last)}")


def template_scales(slots: list[SlotSpec], users: list[list[int]]) -> list[float]:
    """Per bank segment (block or SSN group), the RMS init std (`SlotSpec.init_std`) of the slots reading it.

    Why templates are stored at this scale and not at N(0, 1): with SGD the scale a parameter is stored
    at is its learning rate. A slot weight is W = gain * sum_k alpha_k T_k, so one step moves W by
    gain^2 times what it moves an ordinary weight; with N(0, 1) templates the gain is ~ the init std
    (0.02-0.2) and the bank trained ~100x slower than the full network (digits, 20 images per class,
    15 epochs: 0.66 vs 0.96 ensemble accuracy). Stored at the init scale of their slots, the measured
    gains are ~1, so an SGD step moves a generated weight like an ordinary one and weight decay means
    the same; the composed weight still has exactly its slot's init std (the gains are still measured).
    """
    return [math.sqrt(sum(slots[i].init_std ** 2 for i in u) / len(u)) if u else 1.0 for u in users]


@torch.no_grad()
def scale_segments(flat: Tensor, sizes: list[int], scales: list[float]) -> None:
    """Multiply each consecutive segment of `flat` (lengths `sizes`) by its scale, in place."""
    for segment, c in zip(torch.split(flat, sizes), scales):
        segment.mul_(c)


def init_gains(slots: list[SlotSpec], raw: list[Tensor]) -> Tensor:
    """Per slot, target / realised std of the composed weight (target: `SlotSpec.init_std`, the std the
    `full` baseline draws the same weight at).

    Measured, not derived: with tiled templates (P_b < size) a slot holds few distinct random
    values, so its realised spread can be far from the expected one; measuring makes the init
    std exact at every budget. A constant weight (a single block with P_b = 1, only near the
    minimum budget) has no spread to normalise; it keeps gain 1 (its templates are already at the
    init scale, `template_scales`) so slots still differ through their coefficients instead of
    collapsing to +-target. Shared by every bank kind.
    """
    gains = []
    for spec, w in zip(slots, raw):
        target = spec.init_std
        spread = float(w.double().std(correction=0)) if w.numel() > 1 else 0.0
        gains.append(target / spread if spread > 1e-12 else 1.0)
    return torch.tensor(gains, dtype=torch.float32)

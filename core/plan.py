"""The plan: a pure, serialisable layout computed from slot shapes only (DESIGN.md steps 2-4).

slots -> groups -> blocks -> template counts -> offsets into the flat bank and coefficient vectors.
No tensors here: the plan can be built for CIFAR-100 WRN-28-10 ensembles without data or memory.

The dataclasses (SlotSpec, Block, Group, Plan) are in `core.plan_types`, re-exported here; this module
computes them.
"""

from __future__ import annotations

import math

from .allocation import allocate_budget
from .errors import SuperweightsError
from .plan_types import Block, Group, Plan, SlotSpec

__all__ = [
    "Block",
    "Group",
    "Plan",
    "SlotSpec",
    "build_plan",
    "depth_bin_assignment",
    "minimum_budget",
    "resolve_budget",
]


def depth_bin_assignment(slots: list[SlotSpec], depth_bins: int) -> list[tuple[str, int, int]]:
    """(kind, bin, position-in-bin) of every slot: DESIGN.md step 2.

    Per member and kernel kind, slots in forward order are split into `depth_bins` contiguous bins,
    the extra layers going to the first bins. Slots with equal (kind, bin, position) in different
    members are *corresponding* slots.
    """
    if depth_bins < 1:
        raise SuperweightsError(f"bank.depth_bins must be >= 1, got {depth_bins}")
    by_member_kind: dict[tuple[int, str], list[int]] = {}
    for i, s in enumerate(slots):
        by_member_kind.setdefault((s.member, s.kind), []).append(i)
    keys: list[tuple[str, int, int]] = [("", 0, 0)] * len(slots)
    for (_, kind), ids in by_member_kind.items():
        n = len(ids)
        base, extra = divmod(n, depth_bins)
        j = 0
        for b in range(depth_bins):
            for p in range(base + (1 if b < extra else 0)):
                keys[ids[j]] = (kind, b, p)
                j += 1
    return keys


def resolve_budget(budget: int | float, slots: list[SlotSpec]) -> int:
    """An int is an absolute parameter count; a float is a fraction of all slot weights."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise SuperweightsError(f"bank.budget must be an integer or a float, got {budget!r}")
    if isinstance(budget, float):
        if not math.isfinite(budget) or budget <= 0:
            raise SuperweightsError(f"bank.budget as a fraction must be > 0, got {budget}")
        return max(1, round(budget * sum(s.numel for s in slots)))
    if budget <= 0:
        raise SuperweightsError(f"bank.budget must be positive, got {budget}")
    return budget


def build_plan(
    slots: list[SlotSpec],
    budget: int | float | None,
    depth_bins: int = 4,
    max_templates: int = 4,
    share_coefficients: bool = True,
    group_of: list | None = None,
    coef_of: list | None = None,
) -> Plan:
    """Lay out groups, blocks, templates and offsets so that the bank has exactly `budget` entries.

    `group_of` (optional) gives an explicit group key per slot (gradient-based grouping); by default
    groups are (kind, depth bin). Corresponding slots share a coefficient set when
    `share_coefficients` and they are in the same group; `coef_of` (optional) gives explicit
    coefficient-set keys instead (after unsharing).
    """
    if max_templates < 2:
        raise SuperweightsError(f"bank.max_templates must be >= 2, got {max_templates}")
    if not slots:
        raise SuperweightsError("the members have no conv or linear weights to generate")
    keys = depth_bin_assignment(slots, depth_bins)

    # Groups, in order of first appearance.
    raw_group = group_of if group_of is not None else [(k, b) for (k, b, _) in keys]
    group_index: dict = {}
    slot_group = []
    for gk in raw_group:
        if gk not in group_index:
            group_index[gk] = len(group_index)
        slot_group.append(group_index[gk])
    groups: list[Group] = []
    for gid in range(len(group_index)):
        members = [i for i in range(len(slots)) if slot_group[i] == gid]
        kinds = {slots[i].kind for i in members}
        kernels = {slots[i].shape[2:] for i in members}
        if len(kinds) != 1 or len(kernels) != 1:
            raise SuperweightsError(f"group {gid} mixes kernel kinds {sorted(kinds)}; a group holds one kind")
        groups.append(
            Group(
                id=gid,
                kind=kinds.pop(),
                kernel=tuple(kernels.pop()),
                slots=members,
                out_cuts=sorted({slots[i].shape[0] for i in members}),
                in_cuts=sorted({slots[i].shape[1] for i in members}),
            )
        )

    # Coefficient sets: corresponding slots of the same group share one when sharing is on.
    coef_index: dict = {}
    slot_coef = []
    for i in range(len(slots)):
        if coef_of is not None:
            key = (slot_group[i], coef_of[i])
        else:
            key = (slot_group[i], keys[i]) if share_coefficients else i
        if key not in coef_index:
            coef_index[key] = len(coef_index)
        slot_coef.append(coef_index[key])

    # Blocks: grid cells actually covered by some slot (no bank entry is ever unused).
    blocks: list[Block] = []
    for g in groups:
        cells: dict[tuple[int, int], list[int]] = {}
        for i in g.slots:
            rows = g.out_cuts.index(slots[i].shape[0]) + 1
            cols = g.in_cuts.index(slots[i].shape[1]) + 1
            for r in range(rows):
                for c in range(cols):
                    cells.setdefault((r, c), []).append(i)
        for r, c in sorted(cells):
            users = cells[(r, c)]
            b = Block(
                id=len(blocks),
                group=g.id,
                row=r,
                col=c,
                out_range=(g.out_cuts[r - 1] if r else 0, g.out_cuts[r]),
                in_range=(g.in_cuts[c - 1] if c else 0, g.in_cuts[c]),
                kernel=g.kernel,
                usage=len(users),
                coef_sets=sorted({slot_coef[i] for i in users}),
            )
            g.blocks[(r, c)] = b.id
            blocks.append(b)

    if budget is None:  # layout only (used to find the minimum budget)
        total_budget = len(blocks)
    else:
        total_budget = resolve_budget(budget, slots)
    params = allocate_budget(total_budget, [b.size for b in blocks], [b.usage for b in blocks], max_templates)
    offset = coef_offset = 0
    for b, p in zip(blocks, params):
        b.params = p
        b.templates = max(2, -(-p // b.size))
        b.offset = offset
        b.coef_offset = coef_offset
        offset += p
        coef_offset += len(b.coef_sets) * b.templates
    return Plan(
        budget=total_budget,
        max_templates=max_templates,
        slots=list(slots),
        slot_group=slot_group,
        slot_coef=slot_coef,
        groups=groups,
        blocks=blocks,
        num_coef_sets=len(coef_index),
        coefficient_params=coef_offset,
    )


def minimum_budget(slots: list[SlotSpec], depth_bins: int = 4, share_coefficients: bool = True) -> int:
    """The smallest valid budget: one parameter per block."""
    return len(build_plan(slots, None, depth_bins, 2, share_coefficients).blocks)

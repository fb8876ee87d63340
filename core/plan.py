"""The plan: a pure, serialisable layout computed from slot shapes only (DESIGN.md steps 2-4).

slots -> groups -> blocks -> template counts -> offsets into the flat bank and coefficient vectors.
No tensors here: the plan can be built for CIFAR-100 WRN-28-10 ensembles without data or memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .allocation import allocate_budget
from .errors import SuperweightsError


@dataclass(frozen=True)
class SlotSpec:
    """One weight tensor that the bank provides, as seen in a member (shapes only)."""

    member: int
    name: str  # module path inside the member, e.g. "stages.1.0.conv1"
    kind: str  # kernel kind: "conv3x3", "conv1x1", "linear", ...
    shape: tuple[int, ...]  # (out, in, *kernel)

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Block:
    """One SuperWeight: a grid cell of its group's virtual weight, owning `templates` templates."""

    id: int
    group: int
    row: int
    col: int
    out_range: tuple[int, int]
    in_range: tuple[int, int]
    kernel: tuple[int, ...]
    params: int = 0  # P_b: entries of the bank this block owns
    templates: int = 0  # K_b
    offset: int = 0  # start of theta_b in the flat bank
    coef_sets: list[int] = field(default_factory=list)  # coefficient rows, in order
    coef_offset: int = 0  # start of alpha_b (rows x templates, row-major) in the flat coefficients
    usage: int = 0  # number of slots whose weight contains this block

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_range[1] - self.out_range[0], self.in_range[1] - self.in_range[0], *self.kernel)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def window_starts(self) -> list[int]:
        """Template k is the cyclic window of `size` entries of theta_b starting here."""
        return [k * self.params // self.templates for k in range(self.templates)]


@dataclass
class Group:
    id: int
    kind: str
    kernel: tuple[int, ...]
    slots: list[int]
    out_cuts: list[int]
    in_cuts: list[int]
    blocks: dict[tuple[int, int], int] = field(default_factory=dict)  # (row, col) -> block id


@dataclass
class Plan:
    budget: int
    max_templates: int
    slots: list[SlotSpec]
    slot_group: list[int]  # group id of each slot
    slot_coef: list[int]  # coefficient-set id of each slot
    groups: list[Group]
    blocks: list[Block]
    num_coef_sets: int
    coefficient_params: int

    # -- derived views -------------------------------------------------------------------
    @property
    def bank_params(self) -> int:
        return sum(b.params for b in self.blocks)

    def slot_cells(self, slot_id: int) -> list[list[int]]:
        """Block ids forming the slot's weight, as a row-major grid of the top-left [:O, :I]."""
        g = self.groups[self.slot_group[slot_id]]
        out, inp = self.slots[slot_id].shape[:2]
        rows = g.out_cuts.index(out) + 1
        cols = g.in_cuts.index(inp) + 1
        return [[g.blocks[(r, c)] for c in range(cols)] for r in range(rows)]

    def member_slots(self, member: int) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.member == member]

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "budget": self.budget,
            "max_templates": self.max_templates,
            "bank_params": self.bank_params,
            "coefficient_params": self.coefficient_params,
            "num_coef_sets": self.num_coef_sets,
            "slots": [
                {**asdict(s), "shape": list(s.shape), "group": self.slot_group[i], "coef": self.slot_coef[i]}
                for i, s in enumerate(self.slots)
            ],
            "groups": [
                {
                    "id": g.id,
                    "kind": g.kind,
                    "kernel": list(g.kernel),
                    "slots": g.slots,
                    "out_cuts": g.out_cuts,
                    "in_cuts": g.in_cuts,
                    "blocks": [self._block_json(self.blocks[b]) for b in sorted(g.blocks.values())],
                }
                for g in self.groups
            ],
        }

    @staticmethod
    def _block_json(b: Block) -> dict:
        return {
            "id": b.id,
            "row": b.row,
            "col": b.col,
            "shape": list(b.shape),
            "out_range": list(b.out_range),
            "in_range": list(b.in_range),
            "templates": b.templates,
            "params": b.params,
            "offset": b.offset,
            "coef_sets": b.coef_sets,
            "coef_offset": b.coef_offset,
            "usage": b.usage,
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        slots = [SlotSpec(s["member"], s["name"], s["kind"], tuple(s["shape"])) for s in data["slots"]]
        groups, blocks = [], {}
        for gj in data["groups"]:
            g = Group(gj["id"], gj["kind"], tuple(gj["kernel"]), gj["slots"], gj["out_cuts"], gj["in_cuts"])
            for bj in gj["blocks"]:
                b = Block(
                    bj["id"], g.id, bj["row"], bj["col"], tuple(bj["out_range"]), tuple(bj["in_range"]),
                    g.kernel, bj["params"], bj["templates"], bj["offset"], bj["coef_sets"],
                    bj["coef_offset"], bj["usage"],
                )
                g.blocks[(b.row, b.col)] = b.id
                blocks[b.id] = b
            groups.append(g)
        return cls(
            budget=data["budget"],
            max_templates=data["max_templates"],
            slots=slots,
            slot_group=[s["group"] for s in data["slots"]],
            slot_coef=[s["coef"] for s in data["slots"]],
            groups=groups,
            blocks=[blocks[i] for i in range(len(blocks))],
            num_coef_sets=data["num_coef_sets"],
            coefficient_params=data["coefficient_params"],
        )


# -- building ------------------------------------------------------------------------------


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

"""The plan's dataclasses: SlotSpec (one weight a member needs), Block (one SuperWeight), Group, Plan.

Shapes, ids and offsets only, no tensors (`core.plan` says why), with the plan's JSON form
(`Plan.to_json` / `Plan.from_json`); `core.plan.build_plan` computes their values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


def init_std(shape: tuple[int, ...]) -> float:
    """The std every method initialises a weight of this shape at: the `full` baseline draws it and a bank's
    gains make its composed weights exactly this (`core.bank.init_gains`), so the methods start alike.

    The reference init of the networks we build, as torchvision's ResNets and the WRN authors' code have it:
    Kaiming normal with fan_out for convolutions, sqrt(2 / (out * kernel)), and PyTorch's default for linear
    layers, U(+-1/sqrt(fan_in)), whose std is 1/sqrt(3 fan_in). Measured on the CPU CIFAR-10 protocol
    (BENCHMARKS.md): He with fan_in on every layer, classifier included, cost the full ensemble ~1 point."""
    if len(shape) > 2:
        return math.sqrt(2.0 / (shape[0] * math.prod(shape[2:])))
    return 1.0 / math.sqrt(3.0 * math.prod(shape[1:]))


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

    @property
    def init_std(self) -> float:
        return init_std(self.shape)


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

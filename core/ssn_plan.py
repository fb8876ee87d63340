"""The SSN plan: groups, and per slot its mode (wavg / repeat / mask / inter), templates, phase and offsets.

Pure and serialisable (no tensors), computed from slot shapes and group ids; `core.ssn` describes the
method this lays out (the exact budget split over groups, chained wavg windows, spread phases).
`core.ssn_bank.SSNBank` generates the weights of such a plan.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

from .allocation import largest_remainder
from .errors import BudgetTooSmallError, SuperweightsError
from .plan import SlotSpec, depth_bin_assignment, resolve_budget

UPSAMPLERS = ("repeat", "mask", "inter")
GROUP_MODES = ("one", "depth", "learned")
LAYOUTS = ("chained", "aligned")


@dataclass
class SSNGroup:
    id: int
    slots: list[int]
    params: int = 0  # P_g: entries of the flat bank this group owns
    offset: int = 0  # start of theta_g in the flat bank

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SSNSlot:
    """How one slot is generated from its group's vector."""

    group: int
    mode: str  # "wavg" | "repeat" | "mask" | "inter"
    templates: int  # wavg: K; repeat/mask: copies ceil(S/P_g); inter: 1
    phase: int  # where in theta_g (cyclically) the slot starts reading; 0 for mask and aligned wavg
    grid: tuple[int, int] = (0, 0)  # inter: (h, w) of the small matrix
    coef_offset: int = 0  # start of the slot's coefficients (wavg) or masks (mask) in the flat vector
    coef_count: int = 0


@dataclass
class SSNPlan:
    """Pure, serialisable SSN layout: slots -> groups -> (mode, templates, phase) -> offsets."""

    budget: int
    max_templates: int
    upsample: str
    layout: str
    slots: list[SlotSpec]
    groups: list[SSNGroup]
    slot_layout: list[SSNSlot]
    coefficient_params: int  # wavg coefficients + masks (flat `coefficients` vector)
    mask_params: int  # the mask part of coefficient_params
    method: str = field(default="ssn", init=False)

    @property
    def bank_params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def slot_group(self) -> list[int]:
        return [s.group for s in self.slot_layout]

    def member_slots(self, member: int) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.member == member]

    # -- serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "method": "ssn",
            "budget": self.budget,
            "max_templates": self.max_templates,
            "upsample": self.upsample,
            "layout": self.layout,
            "bank_params": self.bank_params,
            "coefficient_params": self.coefficient_params,
            "mask_params": self.mask_params,
            "groups": [g.to_json() for g in self.groups],
            "slots": [
                {**asdict(s), "shape": list(s.shape), **asdict(lay), "grid": list(lay.grid)}
                for s, lay in zip(self.slots, self.slot_layout)
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> SSNPlan:
        if data.get("method") != "ssn":
            raise SuperweightsError(f"not an SSN plan (method {data.get('method')!r})")
        slots = [SlotSpec(s["member"], s["name"], s["kind"], tuple(s["shape"])) for s in data["slots"]]
        layout = [
            SSNSlot(s["group"], s["mode"], s["templates"], s["phase"], tuple(s["grid"]), s["coef_offset"],
                    s["coef_count"])
            for s in data["slots"]
        ]
        groups = [SSNGroup(g["id"], list(g["slots"]), g["params"], g["offset"]) for g in data["groups"]]
        return cls(data["budget"], data["max_templates"], data["upsample"], data["layout"], slots, groups, layout,
                   data["coefficient_params"], data["mask_params"])


def ssn_groups(slots: list[SlotSpec], mode: str, depth_bins: int = 4) -> list[int]:
    """Group id of every slot for `one` (a single group) or `depth` groups.

    `depth`: per member, its slots in forward order are cut into `depth_bins` contiguous bins (extra
    layers to the first bins, as `core.plan.depth_bin_assignment`), *ignoring the kernel kind* (an SSN
    group is a flat vector, so convs and linears may share); bin b of every member is group b.
    `learned` groups come from k-means in `ensemble.ssn_model` (sklearn stays out of core).
    """
    if mode == "one":
        return [0] * len(slots)
    if mode == "depth":
        keys = depth_bin_assignment([dataclasses.replace(s, kind="any") for s in slots], depth_bins)
        return [b for (_, b, _) in keys]
    if mode == "learned":
        raise SuperweightsError("learned SSN groups need a pre-training: use ensemble.ssn_model.learned_ssn_groups")
    raise SuperweightsError(f"SSN groups must be one of {', '.join(GROUP_MODES)}, got {mode!r}")


def inter_grid(params: int, out: int, cols: int) -> tuple[int, int]:
    """(h, w) of the small matrix `inter` interpolates from: h <= out, w <= cols, h*w >= params.

    Aspect ratio close to out:cols; h*w - params < max(h, w) entries are read twice (cyclic read), so
    every entry of the group vector is used. At params == out*cols it is (out, cols): the identity.
    """
    if not 1 <= params <= out * cols:
        raise ValueError(f"inter needs 1 <= params <= {out * cols}, got {params}")
    h = min(out, max(1, round(math.sqrt(params * out / cols))))
    w = -(-params // h)
    if w > cols:
        w, h = cols, -(-params // cols)
    return h, w


def minimum_ssn_budget(groups: list) -> int:
    """One parameter per group."""
    return len(set(groups))


def build_ssn_plan(
    slots: list[SlotSpec],
    budget: int | float,
    groups: list,
    max_templates: int = 4,
    upsample: str = "repeat",
    layout: str = "chained",
) -> SSNPlan:
    """Lay out the SSN bank so that it has exactly `budget` entries (see the module docstring).

    `groups`: a group key per slot (any hashable; renumbered 0.. in order of first appearance).
    `layout="aligned"` (used only by the learned-groups probe) starts template k of *every* wavg slot at
    k * P_g // K, so coefficient k means the same template window for all slots; no coverage lifting.
    """
    if upsample not in UPSAMPLERS:
        raise SuperweightsError(f"bank.upsample must be one of {', '.join(UPSAMPLERS)}, got {upsample!r}")
    if layout not in LAYOUTS:
        raise SuperweightsError(f"SSN layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if max_templates < 1:
        raise SuperweightsError(f"bank.max_templates must be >= 1, got {max_templates}")
    if not slots:
        raise SuperweightsError("the members have no conv or linear weights to generate")
    if len(groups) != len(slots):
        raise SuperweightsError(f"{len(groups)} group ids for {len(slots)} slots")
    index: dict = {}
    slot_group = [index.setdefault(key, len(index)) for key in groups]
    n_groups = len(index)
    total = resolve_budget(budget, slots)
    if total < n_groups:
        raise BudgetTooSmallError(
            f"bank.budget={total} is too small: the minimum is {n_groups} (one parameter per group)", n_groups)
    members = [[i for i in range(len(slots)) if slot_group[i] == g] for g in range(n_groups)]
    sizes = largest_remainder(total, [sum(slots[i].numel for i in ids) for ids in members], minimum=1)

    out_groups: list[SSNGroup] = []
    layout_of: list[SSNSlot | None] = [None] * len(slots)
    offset = 0
    for gid, (ids, p) in enumerate(zip(members, sizes)):
        out_groups.append(SSNGroup(gid, ids, p, offset))
        offset += p
        n_g = len(ids)
        wavg = [i for i in ids if slots[i].numel <= p]
        templates = {i: max(1, min(max_templates, p // slots[i].numel)) for i in wavg}
        if layout == "chained" and len(wavg) == n_g:  # nothing upsampled reads the whole vector
            _lift_until_covered(p, {i: slots[i].numel for i in wavg}, templates)
        read = 0
        for j, i in enumerate(ids):
            s = slots[i]
            if i in templates:
                phase = read % p if layout == "chained" else 0
                read += templates[i] * s.numel
                layout_of[i] = SSNSlot(gid, "wavg", templates[i], phase)
            elif upsample == "mask":
                layout_of[i] = SSNSlot(gid, "mask", -(-s.numel // p), 0)
            elif upsample == "repeat":
                layout_of[i] = SSNSlot(gid, "repeat", -(-s.numel // p), j * p // n_g)
            else:
                grid = inter_grid(p, s.shape[0], s.numel // s.shape[0])
                layout_of[i] = SSNSlot(gid, "inter", 1, j * p // n_g, grid)

    coef = masks = 0
    for i, lay in enumerate(layout_of):
        lay.coef_offset = coef
        if lay.mode == "wavg":
            lay.coef_count = lay.templates
        elif lay.mode == "mask":
            lay.coef_count = slots[i].numel - out_groups[lay.group].params
            masks += lay.coef_count
        coef += lay.coef_count
    return SSNPlan(total, max_templates, upsample, layout, list(slots), out_groups, layout_of, coef, masks)


def _lift_until_covered(p: int, sizes: dict[int, int], templates: dict[int, int]) -> None:
    """Raise template counts (in place) until the chained windows read all p entries (DESIGN: no unused entries)."""
    read = sum(templates[i] * sizes[i] for i in sizes)
    for limit in (lambda s: p // s, lambda s: -(-p // s)):  # disjoint windows first, then one wrapping
        while read < p:
            grown = False
            for i, s in sizes.items():
                if templates[i] < limit(s):
                    templates[i] += 1
                    read += s
                    grown = True
                    if read >= p:
                        return
            if not grown:
                break

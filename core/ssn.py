"""Shapeshifter Networks (SSN, NPAS paper) as a method beside SuperWeights: plan + bank.

In SSN a parameter group is *one flat vector* theta_g of P_g trainable entries, shared by every slot of
the group whatever its kind or shape (layers are flattened, so kinds can share). A slot of S entries is
generated from theta_g in one of two ways:

* S > P_g, **upsampling** (`upsample`):
    - `repeat`: theta_g tiled cyclically to S entries, starting at a per-slot phase (see below);
      w.flatten()[i] == w.flatten()[i + P_g] for every i (periodic in the group size).
    - `mask`: copies c = 0 .. ceil(S/P_g)-1 of theta_g; copy 0 is theta_g itself, copy c > 0 is
      theta_g * mask_c with a learned mask (the last copy truncated). Masks hold S - P_g entries per slot.
    - `inter`: theta_g, read cyclically from the slot's phase, is reshaped into a small (h, w) matrix
      (h <= O, w <= I*k*k, h*w >= P_g so every entry is read, aspect ratio close to the slot's) and
      bilinearly interpolated (align_corners=True) to the slot's (O, I*k*k); identity at equal size.
* S <= P_g, **wavg**: K = min(max_templates, P_g // S) (at least 1) templates, disjoint consecutive
  windows of S entries of theta_g, combined with the slot's own learned coefficient vector.

Budget: `budget` (int: count; float: fraction of all slot weights) is the number of entries of the flat
`bank` vector, split **exactly** over groups by largest remainder *proportional to each group's total
slot size* (so a budget ratio r gives every group the same ratio; at least one entry per group). Mask
entries and wavg coefficients are trainable too: they are reported separately as `coefficient_params`
(`mask_params` is the mask part), never hidden inside the budget (DESIGN.md vocabulary). Note the cost:
a masked slot adds S - P_g trainable entries, so at low budgets `mask` trains nearly as many parameters
as the full layers (the bank itself stays exactly `budget`). Generated weights have exactly the slot
shapes, so upsampling never changes a member's FLOPs.

Deliberate differences from the authors' code (DESIGN.md lists the defects to avoid):

* No unused bank entries. wavg slots of a group read *chained* regions: slot j's K_j windows start
  where slot j-1's ended (cyclically), so together they cover theta_g whenever the group's wavg slots
  read at least P_g entries in all. If they would not (only possible when P_g exceeds the group's total
  slot size, i.e. budget ratios above 1: max_templates binds or windows run out), the cap is lifted, one template at a
  time round-robin over the group's slots, first while windows stay disjoint, then allowing one
  wrapping (overlapping) window, until they do. A group with any upsampled slot is covered by it.
* No hard ties: `repeat` and `inter` slots start reading theta_g at evenly spread per-slot phases
  (j * P_g // n_g for the j-th of n_g slots), so two same-shape slots of a group differ. `mask` keeps
  phase 0 (copy 0 *is* theta_g, the method's definition); its slots differ through their masks.

Initialisation: theta_g ~ N(0, c_g^2), c_g the RMS He std of the group's slots (core.bank.template_scales
says why: the storage scale is the SGD learning rate); wavg coefficients are random unit vectors (or all 1/sqrt(K) with
`coef_init="uniform"`, used by the learned-groups probe so coefficients only differ by what training
taught them); masks start at 1; a fixed (not trained) per-slot gain, measured on the composed weight
at init, makes every slot's std exactly sqrt(2 / fan_in) (He), as in core/bank.py.

Learned groups need k-means (sklearn), which core may not import: core offers `one` and `depth`
groups; `ensemble.ssn_model` computes learned ones and passes them to `build_ssn_plan` as ids.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .allocation import largest_remainder
from .bank import he_gains, scale_segments, template_scales
from .errors import BudgetTooSmallError, SuperweightsError
from .generation import SSNProgram, matmul_layout, run_ssn, ssn_items, ssn_program
from .plan import SlotSpec, depth_bin_assignment, resolve_budget

UPSAMPLERS = ("repeat", "mask", "inter")
GROUP_MODES = ("one", "depth", "learned")
LAYOUTS = ("chained", "aligned")


# -- plan ----------------------------------------------------------------------------------------


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


# -- bank ----------------------------------------------------------------------------------------


def inter_upsample(small: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Bilinear (align_corners=True) interpolation of a 2-D matrix to (O, prod(shape[1:])), viewed as `shape`."""
    out = F.interpolate(small[None, None], size=(shape[0], math.prod(shape[1:])), mode="bilinear",
                        align_corners=True)
    return out.view(shape)


class SSNBank(nn.Module):
    """Flat `bank` (exactly plan.budget entries), flat `coefficients` (wavg coefficients + masks), `gains`.

    Same interface as `core.bank.SuperWeightBank` where the ensemble uses it: `forward()` returns every
    slot weight in plan order, `forward(slots)` only the requested ones (None elsewhere). Generation is
    batched (`core.generation`): wavg slots are chunked matmuls (one bmm per template count), repeat and
    mask slots one gather of the bank, inter slots one interpolation per distinct (grid, shape); the
    number of kernels does not grow with the number of slots. `core.reference` keeps the per-slot
    generation it replaced.
    """

    def __init__(self, plan: SSNPlan, generator: torch.Generator | None = None, coef_init: str = "random"):
        super().__init__()
        if coef_init not in ("random", "uniform"):
            raise ValueError(f"coef_init must be random or uniform, got {coef_init!r}")
        self.plan = plan
        self.coef_init = coef_init
        self.bank = nn.Parameter(torch.empty(plan.budget))
        self.coefficients = nn.Parameter(torch.empty(plan.coefficient_params))
        self.register_buffer("gains", torch.ones(len(plan.slots)))
        self._group_sizes = [g.params for g in plan.groups]
        self._coef_sizes = [lay.coef_count for lay in plan.slot_layout]
        self._build_index()
        self.reset_parameters(generator)

    # -- generation --------------------------------------------------------------------------
    def _build_index(self) -> None:
        """The generation layout (from the whole plan, so subset programs compute exactly the full one's values)
        and one program per distinct requested slot set (built once, a dict lookup per step)."""
        self._layout = matmul_layout(ssn_items(self.plan))
        self._programs: dict[tuple[int, ...] | None, SSNProgram | None] = {}

    def _program(self, slots: Iterable[int] | None) -> SSNProgram | None:
        key = None if slots is None else tuple(slots)
        hit = self._programs.get(key, False)
        if hit is False:
            n = len(self.plan.slots)
            ids = list(range(n)) if key is None else sorted(set(key))
            if ids and not 0 <= ids[0] <= ids[-1] < n:
                raise IndexError(f"slot ids must be in [0, {n}), got {key}")
            hit = self._programs[key] = ssn_program(self.plan, self._layout, ids) if ids else None
        return None if hit is None else hit.to(self.bank.device)

    def group_vectors(self) -> tuple[Tensor, ...]:
        return torch.split(self.bank, self._group_sizes)

    def _generate(self, slots: Iterable[int] | None, gains: Tensor | None) -> list[Tensor | None]:
        program = self._program(slots)
        if program is None:
            return [None] * len(self.plan.slots)
        return run_ssn(program, self.bank, self.coefficients, gains, len(self.plan.slots))

    def raw_weights(self, slots: Iterable[int] | None = None) -> list[Tensor | None]:
        """Slot weights before the fixed gain, in plan slot order.

        `slots` (plan slot ids): generate only those (only their matmul chunks and gathers); the other
        entries are None.
        """
        return self._generate(slots, None)

    def forward(self, slots: Iterable[int] | None = None) -> list[Tensor | None]:
        """Slot weights in plan slot order (one regeneration per training step): every slot, or only `slots`
        (plan slot ids; None elsewhere), e.g. a member-parallel worker's own members'."""
        return self._generate(slots, self.gains)

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """theta_g ~ N(0, c_g^2) (core.bank.template_scales: the slots' RMS He std, so SGD moves generated
        weights like ordinary ones); wavg coefficients unit-norm (random or uniform); masks 1; He gains measured."""
        self.bank.normal_(0.0, 1.0, generator=generator)
        scale_segments(self.bank, self._group_sizes, template_scales(self.plan.slots, [g.slots for g in self.plan.groups]))
        coefs = torch.split(self.coefficients, self._coef_sizes)
        for lay, c in zip(self.plan.slot_layout, coefs):
            if lay.mode == "mask":
                c.fill_(1.0)
            elif lay.mode == "wavg":
                if self.coef_init == "uniform":
                    c.fill_(1.0 / math.sqrt(lay.templates))
                else:
                    v = torch.randn(lay.templates, generator=generator)
                    c.copy_(v / v.norm().clamp_min(1e-12))
        self.gains.fill_(1.0)
        self.gains.copy_(he_gains(self.plan.slots, self.raw_weights()))

    def slot_coefficients(self, slot: int) -> Tensor:
        """The slot's wavg coefficients or masks (a view of the flat vector)."""
        lay = self.plan.slot_layout[slot]
        return self.coefficients[lay.coef_offset : lay.coef_offset + lay.coef_count]

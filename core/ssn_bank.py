"""The SSN bank: the flat trainable vectors (bank, coefficients) and fixed gains that generate every slot
weight of an `SSNPlan`, through the SSN program of `core.generation`.

`core.ssn` describes the method and the initialisation (`reset_parameters`) implemented here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bank import init_gains, load_channels_last, scale_segments, template_scales
from .generation import SSNProgram, matmul_layout, run_ssn, ssn_items, ssn_program
from .ssn_plan import SSNPlan


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

    def __init__(self, plan: SSNPlan, generator: torch.Generator | None = None, coef_init: str = "random",
                 channels_last: bool = False):
        """`channels_last`: as `core.bank.SuperWeightBank`'s: wavg, repeat and mask conv weights are read as
        [O, kh, kw, I] and handed out channels_last (saved as the buffer `channels_last`)."""
        super().__init__()
        if coef_init not in ("random", "uniform"):
            raise ValueError(f"coef_init must be random or uniform, got {coef_init!r}")
        self.plan = plan
        self.coef_init = coef_init
        self.bank = nn.Parameter(torch.empty(plan.budget))
        self.coefficients = nn.Parameter(torch.empty(plan.coefficient_params))
        self.register_buffer("gains", torch.ones(len(plan.slots)))
        self.register_buffer("channels_last", torch.tensor(int(channels_last)))
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
            hit = self._programs[key] = (ssn_program(self.plan, self._layout, ids, bool(self.channels_last))
                                         if ids else None)
        return None if hit is None else hit.to(self.bank.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        load_channels_last(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._programs = {}

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
        """theta_g ~ N(0, c_g^2) (core.bank.template_scales: the slots' RMS init std, so SGD moves generated
        weights like ordinary ones); wavg coefficients unit-norm (random or uniform); masks 1; init gains measured."""
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
        self.gains.copy_(init_gains(self.plan.slots, self.raw_weights()))

    def slot_coefficients(self, slot: int) -> Tensor:
        """The slot's wavg coefficients or masks (a view of the flat vector)."""
        lay = self.plan.slot_layout[slot]
        return self.coefficients[lay.coef_offset : lay.coef_offset + lay.coef_count]

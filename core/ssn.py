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

Initialisation: theta_g ~ N(0, c_g^2), c_g the RMS init std of the group's slots (core.bank.template_scales
says why: the storage scale is the SGD learning rate); wavg coefficients are random unit vectors (or all 1/sqrt(K) with
`coef_init="uniform"`, used by the learned-groups probe so coefficients only differ by what training
taught them); masks start at 1; a fixed (not trained) per-slot gain, measured on the composed weight
at init, makes every slot's std exactly its `SlotSpec.init_std`, as in core/bank.py.

Learned groups need k-means (sklearn), which core may not import: core offers `one` and `depth`
groups; `ensemble.ssn_model` computes learned ones and passes them to `build_ssn_plan` as ids.

Where the code is (this module is the way in and re-exports their public names): `core.ssn_plan` (the
plan: groups, modes, templates, phases, offsets) and `core.ssn_bank` (`SSNBank`: the trainable vectors,
initialisation and generation).
"""

from __future__ import annotations

from .ssn_bank import SSNBank, inter_upsample
from .ssn_plan import (
    GROUP_MODES,
    LAYOUTS,
    UPSAMPLERS,
    SSNGroup,
    SSNPlan,
    SSNSlot,
    build_ssn_plan,
    inter_grid,
    minimum_ssn_budget,
    ssn_groups,
)

__all__ = [
    "GROUP_MODES",
    "LAYOUTS",
    "SSNBank",
    "SSNGroup",
    "SSNPlan",
    "SSNSlot",
    "UPSAMPLERS",
    "build_ssn_plan",
    "inter_grid",
    "inter_upsample",
    "minimum_ssn_budget",
    "ssn_groups",
]

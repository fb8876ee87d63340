"""The `ssn` bank method (NPAS Shapeshifter Networks): plan, build, summary, relayout, start layout and
learning steps for its entry in `ensemble.methods.METHODS`. Learned groups come from
`ensemble.ssn_model.learned_ssn_groups` (a pre-training), which the loop runs where `pretrains` says."""

from __future__ import annotations

import dataclasses

import torch

from core.errors import SuperweightsError
from core.plan import SlotSpec
from core.ssn import SSNPlan, build_ssn_plan, ssn_groups

from .bank_method import FROM_CONFIG, FROM_LEARNED, Counts
from .config import Config
from .data import DatasetInfo
from .model import SSNEnsemble
from .planning import member_slots


def make_ssn_plan(config: Config, info: DatasetInfo, upsample: str = "repeat", groups_mode: str = "depth",
                  max_templates: int = 4, budget: int | float | None = None, groups: list[int] | None = None,
                  slots: list[SlotSpec] | None = None) -> SSNPlan:
    """SSN plan of the config's members. `groups` (explicit ids per slot) wins over `groups_mode`;
    `learned` needs them (from `ensemble.ssn_model.learned_ssn_groups`). `depth` uses `config.bank.depth_bins` bins."""
    slots = slots if slots is not None else member_slots(config, info)
    if groups is None:
        if groups_mode == "learned":
            raise SuperweightsError("learned SSN groups need a pre-training first: call learned_ssn_groups(...) "
                                    "and pass its result as groups")
        groups = ssn_groups(slots, groups_mode, config.bank.depth_bins)
    return build_ssn_plan(slots, config.bank.budget if budget is None else budget, groups, max_templates, upsample)


def ssn_plan(config: Config, info: DatasetInfo, slots: list[SlotSpec]) -> SSNPlan:
    b = config.bank
    if b.ssn_groups == "learned":
        raise SuperweightsError("learned SSN groups are found by pre-training during `superweights train`; "
                                "`superweights plan --from CHECKPOINT` shows them")
    return make_ssn_plan(config, info, b.upsample, b.ssn_groups, b.max_templates, b.budget, slots=slots)


def ssn_build(config, info, members, names, plan: SSNPlan, channels_last: bool = False) -> SSNEnsemble:
    generator = torch.Generator().manual_seed(config.train.seed)
    return SSNEnsemble(members, names, info.mean, info.std, plan, generator, exit_weights=config.ensemble.exit_weights,
                       channels_last=channels_last)


def ssn_summary(plan: SSNPlan, member_names: list[str]) -> dict:
    """Plan fields for `plan --json`-style summaries (SSN groups have no blocks/kind: they are flat vectors)."""
    return {
        "budget": plan.budget,
        "bank_params": plan.bank_params,
        "coefficient_params": plan.coefficient_params,
        "mask_params": plan.mask_params,
        "upsample": plan.upsample,
        # 0 means every slot is a wavg slot (high budgets): then repeat, mask and inter are the same model
        "upsampled_slots": sum(lay.mode != "wavg" for lay in plan.slot_layout),
        "groups": [
            {
                "id": g.id,
                "params": g.params,
                "slots": [
                    {"slot": f"{member_names[plan.slots[i].member]}:{plan.slots[i].name}",
                     "mode": plan.slot_layout[i].mode, "templates": plan.slot_layout[i].templates}
                    for i in g.slots
                ],
            }
            for g in plan.groups
        ],
    }


def ssn_method_summary(config: Config, slots, plan: SSNPlan, c: Counts) -> dict:
    ssn = ssn_summary(plan, list(config.ensemble.members))
    return {**ssn, "budget_ratio": ssn["budget"] / c.slot_weights, "private_params": c.private,
            "total_params": ssn["bank_params"] + ssn["coefficient_params"] + c.private,
            "full_ensemble_params": c.full, "members": c.rows}


def ssn_relayout(config: Config, info, slots, plan: SSNPlan) -> tuple[SSNPlan, str]:
    b = config.bank
    if b.ssn_groups != "learned":
        return make_ssn_plan(config, info, b.upsample, b.ssn_groups, b.max_templates, b.budget, slots=slots), FROM_CONFIG
    return build_ssn_plan(plan.slots, plan.budget, plan.slot_group, plan.max_templates, plan.upsample,
                          plan.layout), FROM_LEARNED


def ssn_start(config: Config) -> Config | None:
    """Learned groups only exist after the loop's pre-training: the run starts from the depth-bin layout
    (same exact budget, same members and FLOPs)."""
    b = config.bank
    if b.ssn_groups != "learned":
        return None
    return dataclasses.replace(config, bank=dataclasses.replace(b, ssn_groups="depth"))


def learns_groups(config: Config) -> bool:
    """Learned SSN groups: found by a pre-training (+ k-means) before the first epoch."""
    return config.bank.ssn_groups == "learned"

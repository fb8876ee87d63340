"""The bank methods, in one table: `superweights`, `ssn` (NPAS Shapeshifter Networks) and `full`.

`METHODS[config.bank.method]` is a `BankMethod`; every question whose answer depends on the method is
asked of it here, and nowhere else:

* `plan(config, info, slots)`: the plan the config lays out over the members' slots (None: no bank);
* `build(config, info, members, names, plan)`: the ensemble on that plan (seeded by `train.seed`);
* `summary(config, slots, plan, counts)`: the method's fields of `plan_summary` (`plan --json`);
* `relayout(config, info, slots, plan)`: a saved plan laid out again, to check it (`ensemble.checkpoint`);
* `plan_type`: what reads plan.json's `bank` (`Plan`, `SSNPlan`, None);
* `start_layout(config)`: where the plan is only learned during training (learned SSN groups), the config
  whose plan describes the run's start; None where the plan is known before training.

`make_plan`, `build_ensemble` and `plan_summary` are the three ways in; the method's learning steps during
training (gradient regrouping, coefficient unsharing, learned SSN groups) are phases of `ensemble.loop`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import SuperweightsError
from core.flops import module_flops
from core.plan import Plan, SlotSpec, build_plan
from core.ssn import SSNPlan, build_ssn_plan, ssn_groups

from .config import Config
from .data import DatasetInfo
from .model import SSNEnsemble, StackedEnsemble, SuperWeightEnsemble
from .planning import (
    build_members,
    check_bank_memory,
    check_memory,
    check_plan_fits,
    example_input,
    member_slots,
    meta_members,
)

AnyPlan = Plan | SSNPlan | None


@dataclass(frozen=True)
class Counts:
    """What every summary reports: the members' rows and parameter counts without a bank."""

    rows: list[dict]  # [{name, params, flops}] per member
    slot_weights: int  # weights of every slot (what a bank generates)
    full: int  # parameters of the full-parameter ensemble
    private: int  # norms, biases: parameters no bank generates


@dataclass(frozen=True)
class BankMethod:
    name: str
    plan_type: type | None
    plan: Callable[[Config, DatasetInfo, list[SlotSpec]], AnyPlan]
    build: Callable[[Config, DatasetInfo, list[nn.Module], list[str], AnyPlan], StackedEnsemble]
    summary: Callable[[Config, list[SlotSpec], AnyPlan, Counts], dict]
    relayout: Callable[[Config, DatasetInfo, list[SlotSpec], AnyPlan], tuple[AnyPlan, str]]
    start_layout: Callable[[Config], Config | None] = lambda config: None

    @property
    def has_bank(self) -> bool:
        return self.plan_type is not None


FROM_CONFIG = "when laid out from config.json"
FROM_LEARNED = "when its learned groups are laid out again"


# -- superweights ---------------------------------------------------------------------------------------


def _superweights_plan(config: Config, info: DatasetInfo, slots: list[SlotSpec]) -> Plan:
    b = config.bank
    return build_plan(slots, b.budget, depth_bins=b.depth_bins, max_templates=b.max_templates,
                      share_coefficients=b.share_coefficients)


def _superweights_build(config, info, members, names, plan: Plan) -> SuperWeightEnsemble:
    generator = torch.Generator().manual_seed(config.train.seed)
    return SuperWeightEnsemble(members, names, info.mean, info.std, plan, generator,
                               exit_weights=config.ensemble.exit_weights)


def _superweights_summary(config: Config, slots, plan: Plan, c: Counts) -> dict:
    names = config.ensemble.members
    return {
        "budget": plan.budget,
        "budget_ratio": plan.budget / c.slot_weights,
        "bank_params": plan.bank_params,
        "coefficient_params": plan.coefficient_params,
        "grouping": config.bank.grouping,
        "coefficient_sets": plan.num_coef_sets,
        "shared_slot_pairs": sum(n * (n - 1) // 2 for n in Counter(plan.slot_coef).values()),
        "private_params": c.private,
        "total_params": plan.bank_params + plan.coefficient_params + c.private,
        "full_ensemble_params": c.full,
        "members": c.rows,
        "groups": [
            {
                "id": g.id,
                "kind": g.kind,
                "slots": [f"{names[plan.slots[i].member]}:{plan.slots[i].name}" for i in g.slots],
                "blocks": [
                    {"shape": list(plan.blocks[b].shape), "templates": plan.blocks[b].templates, "params": plan.blocks[b].params}
                    for b in sorted(g.blocks.values())
                ],
            }
            for g in plan.groups
        ],
    }


def _superweights_relayout(config: Config, info, slots, plan: Plan) -> tuple[Plan, str]:
    b = config.bank
    if b.grouping == "depth" and not b.unshare_epoch:
        return _superweights_plan(config, info, slots), FROM_CONFIG
    # regrouped by gradients and/or coefficients unshared: the groups and sets are learned
    return build_plan(plan.slots, plan.budget, b.depth_bins, plan.max_templates, group_of=plan.slot_group,
                      coef_of=plan.slot_coef), FROM_LEARNED


# -- ssn ------------------------------------------------------------------------------------------------


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


def _ssn_plan(config: Config, info: DatasetInfo, slots: list[SlotSpec]) -> SSNPlan:
    b = config.bank
    if b.ssn_groups == "learned":
        raise SuperweightsError("learned SSN groups are found by pre-training during `superweights train`; "
                                "`superweights plan --from CHECKPOINT` shows them")
    return make_ssn_plan(config, info, b.upsample, b.ssn_groups, b.max_templates, b.budget, slots=slots)


def _ssn_build(config, info, members, names, plan: SSNPlan) -> SSNEnsemble:
    generator = torch.Generator().manual_seed(config.train.seed)
    return SSNEnsemble(members, names, info.mean, info.std, plan, generator, exit_weights=config.ensemble.exit_weights)


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


def _ssn_summary(config: Config, slots, plan: SSNPlan, c: Counts) -> dict:
    ssn = ssn_summary(plan, list(config.ensemble.members))
    return {**ssn, "budget_ratio": ssn["budget"] / c.slot_weights, "private_params": c.private,
            "total_params": ssn["bank_params"] + ssn["coefficient_params"] + c.private,
            "full_ensemble_params": c.full, "members": c.rows}


def _ssn_relayout(config: Config, info, slots, plan: SSNPlan) -> tuple[SSNPlan, str]:
    b = config.bank
    if b.ssn_groups != "learned":
        return make_ssn_plan(config, info, b.upsample, b.ssn_groups, b.max_templates, b.budget, slots=slots), FROM_CONFIG
    return build_ssn_plan(plan.slots, plan.budget, plan.slot_group, plan.max_templates, plan.upsample,
                          plan.layout), FROM_LEARNED


def _ssn_start(config: Config) -> Config | None:
    """Learned groups only exist after the loop's pre-training: the run starts from the depth-bin layout
    (same exact budget, same members and FLOPs)."""
    b = config.bank
    if b.ssn_groups != "learned":
        return None
    return dataclasses.replace(config, bank=dataclasses.replace(b, ssn_groups="depth"))


# -- full -----------------------------------------------------------------------------------------------


@torch.no_grad()
def he_init_(module: nn.Module) -> None:
    """The `full` baseline's init: He (fan_in, ReLU) normal for conv/linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight[0].numel()))
            if m.bias is not None:
                m.bias.zero_()


def _full_build(config, info, members, names, plan: None) -> StackedEnsemble:
    for m in members:
        he_init_(m)
    return StackedEnsemble(members, names, info.mean, info.std, exit_weights=config.ensemble.exit_weights)


def _full_summary(config: Config, slots, plan: None, c: Counts) -> dict:
    return {"budget": c.slot_weights, "bank_params": 0, "coefficient_params": 0, "private_params": c.private,
            "total_params": c.full, "full_ensemble_params": c.full, "members": c.rows, "groups": []}


METHODS: dict[str, BankMethod] = {
    "superweights": BankMethod("superweights", Plan, _superweights_plan, _superweights_build, _superweights_summary,
                               _superweights_relayout),
    "ssn": BankMethod("ssn", SSNPlan, _ssn_plan, _ssn_build, _ssn_summary, _ssn_relayout, _ssn_start),
    "full": BankMethod("full", None, lambda config, info, slots: None, _full_build, _full_summary,
                       lambda config, info, slots, plan: (None, FROM_CONFIG)),
}


def method_of(config: Config) -> BankMethod:
    return METHODS[config.bank.method]


# -- the ways in ----------------------------------------------------------------------------------------


def make_plan(config: Config, info: DatasetInfo, slots: list[SlotSpec] | None = None) -> AnyPlan:
    """The plan the config lays out (None for `full`), over `slots` (default: the members' traced slots)."""
    return method_of(config).plan(config, info, slots if slots is not None else member_slots(config, info))


def build_ensemble(config: Config, info: DatasetInfo, plan: AnyPlan = None) -> StackedEnsemble:
    """Build the model the config asks for, on `plan` (e.g. from plan.json; default: the config's own plan);
    seeded by `train.seed` (same seed, same weights)."""
    method = method_of(config)
    members, names = build_members(config, info)
    if method.has_bank:
        plan = plan if plan is not None else method.plan(config, info, member_slots(config, info))
        check_plan_fits(plan, members, names)
    return method.build(config, info, members, names, plan)


def plan_summary(config: Config, info: DatasetInfo, plan: AnyPlan = None, before_training: bool = False,
                 memory_check: bool | None = None) -> dict:
    """Stable JSON fields: budget, bank_params, coefficient_params, private_params, total_params,
    full_ensemble_params, members [{name, params, flops}], groups [{id, kind, slots, blocks}].

    `before_training`: the summary a run starts from. A plan learned during training (learned SSN groups,
    after the loop's pre-training) is then described by its start layout (`BankMethod.start_layout`: the
    same exact budget, members and FLOPs) with `"groups_learned_at_start": true`; without it such a config
    is an error (`plan --from` shows the learned groups of a trained checkpoint).
    `memory_check` (default: `before_training`): refuse (`check_memory`) a run that cannot fit this
    machine's memory, first on the bank alone, before laying out a plan for an absurd budget, then on
    the whole summary."""
    method = method_of(config)
    start = method.start_layout(config) if before_training and plan is None else None
    extra = {"groups_learned_at_start": True} if start is not None else {}
    config = start or config
    check = before_training if memory_check is None else memory_check
    members = meta_members(config, info)
    slots = member_slots(config, info, members)
    if check and plan is None and method.has_bank:
        check_bank_memory(config, slots)
    x = example_input(info)
    rows = [{"name": name, "params": sum(p.numel() for p in m.parameters()), "flops": module_flops(m, x)}
            for name, m in zip(config.ensemble.members, members)]
    full = sum(r["params"] for r in rows)
    slot_weights = sum(s.numel for s in slots)
    counts = Counts(rows, slot_weights, full, full - slot_weights)
    if plan is None:
        plan = method.plan(config, info, slots)
    summary = {
        "method": config.bank.method,
        "dataset": info.name,
        "input_shape": [info.in_channels, *info.image_size],
        "num_classes": info.num_classes,
        "slot_weights": slot_weights,
        **method.summary(config, slots, plan, counts),
        **extra,
    }
    if check:
        check_memory(summary, config.train.momentum)
    return summary

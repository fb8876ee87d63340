"""The `superweights` bank method (SuperWeight Ensembles): plan, build, summary, relayout and learning steps
for its entry in `ensemble.methods.METHODS`."""

from __future__ import annotations

from collections import Counter

import torch

from core.plan import Plan, SlotSpec, build_plan

from .bank_method import FROM_CONFIG, FROM_LEARNED, Counts
from .config import Config
from .data import DatasetInfo
from .model import SuperWeightEnsemble


def superweights_plan(config: Config, info: DatasetInfo, slots: list[SlotSpec]) -> Plan:
    b = config.bank
    return build_plan(slots, b.budget, depth_bins=b.depth_bins, max_templates=b.max_templates,
                      share_coefficients=b.share_coefficients)


def superweights_build(config, info, members, names, plan: Plan, channels_last: bool = False) -> SuperWeightEnsemble:
    generator = torch.Generator().manual_seed(config.train.seed)
    return SuperWeightEnsemble(members, names, info.mean, info.std, plan, generator,
                               exit_weights=config.ensemble.exit_weights, channels_last=channels_last)


def superweights_summary(config: Config, slots, plan: Plan, c: Counts) -> dict:
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


def superweights_relayout(config: Config, info, slots, plan: Plan) -> tuple[Plan, str]:
    b = config.bank
    if b.grouping == "depth" and not b.unshare_epoch:
        return superweights_plan(config, info, slots), FROM_CONFIG
    # regrouped by gradients and/or coefficients unshared: the groups and sets are learned
    return build_plan(plan.slots, plan.budget, b.depth_bins, plan.max_templates, group_of=plan.slot_group,
                      coef_of=plan.slot_coef), FROM_LEARNED


# -- learning steps (SuperWeights steps 7-8, run by ensemble.loop through ensemble.grouping) --


def gradient_warmup_epochs(config: Config) -> int:
    """Epochs on depth-bin groups before gradient regrouping (0 unless bank.grouping = "gradient")."""
    return config.grouping.warmup_epochs if config.bank.grouping == "gradient" else 0


def unshare_epoch(config: Config) -> int:
    """Training epoch after which conflicting coefficients are unshared (bank.unshare_epoch; 0 = never)."""
    return config.bank.unshare_epoch

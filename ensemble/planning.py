"""From config to plan: trace members on the meta device (no data, no memory) and lay out the bank.

Also the plan summary that `superweights plan --json` prints; its top-level field names are stable.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from torch import nn

from core.errors import SuperweightsError
from core.flops import module_flops
from core.plan import Plan, SlotSpec, build_plan
from core.slots import trace_slots

from . import members as _members  # noqa: F401  (registers every architecture)
from .config import Config
from .data import DatasetInfo
from .exits import exits_enabled, wrap_with_exits
from .registry import create_model


def example_input(info: DatasetInfo, device: str | torch.device = "meta") -> torch.Tensor:
    return torch.zeros(1, info.in_channels, *info.image_size, device=device)


def meta_members(config: Config, info: DatasetInfo) -> list[nn.Module]:
    """Members built on the meta device: shapes and FLOPs only, even for WRN-28-10 on CIFAR-100."""
    with torch.device("meta"):
        # eval(): FLOP counting runs a batch of one, which BatchNorm refuses in training mode at 1x1 maps
        members = [create_model(n, info.in_channels, info.num_classes).eval() for n in config.ensemble.members]
        if not exits_enabled(config.ensemble.exits):
            return members
        # Exit heads are members' modules too: their linears become bank slots like any other weight.
        x = example_input(info)
        return [wrap_with_exits(m, n, config.ensemble.exits, x, info.num_classes, m).eval()
                for m, n in zip(members, config.ensemble.members)]


def member_slots(config: Config, info: DatasetInfo, members: list[nn.Module] | None = None) -> list[SlotSpec]:
    members = members if members is not None else meta_members(config, info)
    x = example_input(info)
    return [
        SlotSpec(i, name, kind, shape)
        for i, m in enumerate(members)
        for name, kind, shape in trace_slots(m, x)
    ]


def make_plan(config: Config, info: DatasetInfo, slots: list[SlotSpec] | None = None) -> Plan:
    b = config.bank
    return build_plan(
        slots if slots is not None else member_slots(config, info),
        b.budget,
        depth_bins=b.depth_bins,
        max_templates=b.max_templates,
        share_coefficients=b.share_coefficients,
    )


def plan_summary(config: Config, info: DatasetInfo, plan: Plan | None = None, before_training: bool = False) -> dict:
    """Stable JSON fields: budget, bank_params, coefficient_params, private_params, total_params,
    full_ensemble_params, members [{name, params, flops}], groups [{id, kind, slots, blocks}].

    `before_training`: the summary a run starts from. Learned SSN groups only exist after the loop's
    pre-training, so it then describes the depth-bin layout (same exact budget, same members and FLOPs)
    and says `"groups_learned_at_start": true`; without it such a config is an error (`plan --from`
    shows the learned groups of a trained checkpoint)."""
    b = config.bank
    if before_training and plan is None and b.method == "ssn" and b.ssn_groups == "learned":
        depth = dataclasses.replace(config, bank=dataclasses.replace(b, ssn_groups="depth"))
        return {**plan_summary(depth, info), "groups_learned_at_start": True}
    members = meta_members(config, info)
    slots = member_slots(config, info, members)
    x = example_input(info)
    rows = [
        {"name": name, "params": sum(p.numel() for p in m.parameters()), "flops": module_flops(m, x)}
        for name, m in zip(config.ensemble.members, members)
    ]
    full = sum(r["params"] for r in rows)
    slot_weights = sum(s.numel for s in slots)
    private = full - slot_weights
    summary = {
        "method": config.bank.method,
        "dataset": info.name,
        "input_shape": [info.in_channels, *info.image_size],
        "num_classes": info.num_classes,
        "slot_weights": slot_weights,
    }
    if config.bank.method == "full":
        return {
            **summary, "budget": slot_weights, "bank_params": 0, "coefficient_params": 0,
            "private_params": private, "total_params": full, "full_ensemble_params": full,
            "members": rows, "groups": [],
        }
    if config.bank.method == "ssn":
        ssn = _ssn_summary(config, info, slots, plan)
        return {**summary, **ssn, "budget_ratio": ssn["budget"] / slot_weights, "private_params": private,
                "total_params": ssn["bank_params"] + ssn["coefficient_params"] + private,
                "full_ensemble_params": full, "members": rows}
    plan = plan or make_plan(config, info, slots)
    return {
        **summary,
        "budget": plan.budget,
        "budget_ratio": plan.budget / slot_weights,
        "bank_params": plan.bank_params,
        "coefficient_params": plan.coefficient_params,
        "grouping": config.bank.grouping,
        "coefficient_sets": plan.num_coef_sets,
        "shared_slot_pairs": sum(n * (n - 1) // 2 for n in Counter(plan.slot_coef).values()),
        "private_params": private,
        "total_params": plan.bank_params + plan.coefficient_params + private,
        "full_ensemble_params": full,
        "members": rows,
        "groups": [
            {
                "id": g.id,
                "kind": g.kind,
                "slots": [f"{config.ensemble.members[plan.slots[i].member]}:{plan.slots[i].name}" for i in g.slots],
                "blocks": [
                    {"shape": list(plan.blocks[b].shape), "templates": plan.blocks[b].templates, "params": plan.blocks[b].params}
                    for b in sorted(g.blocks.values())
                ],
            }
            for g in plan.groups
        ],
    }


def _ssn_summary(config: Config, info: DatasetInfo, slots: list[SlotSpec], plan) -> dict:
    from .ssn_model import make_ssn_plan, ssn_summary  # lazy: ssn_model builds on this module

    b = config.bank
    if plan is None:
        if b.ssn_groups == "learned":
            raise SuperweightsError("learned SSN groups are found by pre-training during `superweights train`; "
                                    "`superweights plan --from CHECKPOINT` shows them")
        plan = make_ssn_plan(config, info, b.upsample, b.ssn_groups, b.max_templates, b.budget, slots=slots)
    return ssn_summary(plan, list(config.ensemble.members))

"""From config to plan: trace members on the meta device (no data, no memory) and lay out the bank.

Also the plan summary that `superweights plan --json` prints; its top-level field names are stable.
"""

from __future__ import annotations

import torch
from torch import nn

from core.flops import module_flops
from core.plan import Plan, SlotSpec, build_plan
from core.slots import trace_slots

from . import members as _members  # noqa: F401  (registers every architecture)
from .config import Config
from .data import DatasetInfo
from .registry import create_model


def example_input(info: DatasetInfo, device: str | torch.device = "meta") -> torch.Tensor:
    return torch.zeros(1, info.in_channels, *info.image_size, device=device)


def meta_members(config: Config, info: DatasetInfo) -> list[nn.Module]:
    """Members built on the meta device: shapes and FLOPs only, even for WRN-28-10 on CIFAR-100."""
    with torch.device("meta"):
        return [create_model(n, info.in_channels, info.num_classes) for n in config.ensemble.members]


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


def plan_summary(config: Config, info: DatasetInfo, plan: Plan | None = None) -> dict:
    """Stable JSON fields: budget, bank_params, coefficient_params, private_params, total_params,
    full_ensemble_params, members [{name, params, flops}], groups [{id, kind, slots, blocks}]."""
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
    plan = plan or make_plan(config, info, slots)
    return {
        **summary,
        "budget": plan.budget,
        "budget_ratio": plan.budget / slot_weights,
        "bank_params": plan.bank_params,
        "coefficient_params": plan.coefficient_params,
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

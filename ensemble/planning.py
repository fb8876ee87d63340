"""From config to plan: trace members on the meta device (no data, no memory) and lay out the bank.

Also the plan summary that `superweights plan --json` prints; its top-level field names are stable.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import torch
from torch import nn

from core.errors import SuperweightsError
from core.flops import module_flops
from core.plan import Plan, SlotSpec, build_plan, resolve_budget
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


def plan_summary(config: Config, info: DatasetInfo, plan: Plan | None = None, before_training: bool = False,
                 memory_check: bool | None = None) -> dict:
    """Stable JSON fields: budget, bank_params, coefficient_params, private_params, total_params,
    full_ensemble_params, members [{name, params, flops}], groups [{id, kind, slots, blocks}].

    `before_training`: the summary a run starts from. Learned SSN groups only exist after the loop's
    pre-training, so it then describes the depth-bin layout (same exact budget, same members and FLOPs)
    and says `"groups_learned_at_start": true`; without it such a config is an error (`plan --from`
    shows the learned groups of a trained checkpoint).
    `memory_check` (default: `before_training`): refuse (`check_memory`) a run that cannot fit this
    machine's memory, first on the bank alone, before laying out a plan for an absurd budget, then on
    the whole summary."""
    b = config.bank
    if before_training and plan is None and b.method == "ssn" and b.ssn_groups == "learned":
        config = dataclasses.replace(config, bank=dataclasses.replace(b, ssn_groups="depth"))
        extra = {"groups_learned_at_start": True}
    else:
        extra = {}
    check = before_training if memory_check is None else memory_check
    summary = {**_summary(config, info, plan, check), **extra}
    if check:
        check_memory(summary, config.train.momentum)
    return summary


def training_memory_bytes(summary: dict, momentum: bool = True) -> int:
    """Bytes one training process needs at least (float32), from a `plan_summary`: every trainable parameter
    (bank, coefficients, masks, private norms/biases; the members' own weights for `full`) with its gradient
    and, with momentum, its SGD momentum buffer; plus the generated slot weights and their gradients, alive
    during each step. Activations, data and the framework itself come on top (they depend on the batch),
    so this is a lower bound; each Ray worker on the machine holds its own copy."""
    trainable = summary["total_params"]  # = bank + coefficient + private parameters, for every method
    generated = 0 if summary["method"] == "full" else summary["slot_weights"]
    return 4 * (trainable * (3 if momentum else 2) + 2 * generated)


def available_memory_bytes() -> int | None:
    """This machine's available memory (MemAvailable of /proc/meminfo, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(summary: dict, momentum: float = 0.9, available: int | None = None) -> int:
    """Refuse (one line, with the estimate in GB) a run whose parameters cannot fit this machine's available
    memory (`training_memory_bytes`); returns the estimate. Skipped when the available memory is unknown."""
    need = training_memory_bytes(summary, momentum > 0)
    available = available if available is not None else available_memory_bytes()
    if available is not None and need > available:
        full = summary["method"] == "full"
        what = "the full members" if full else f"a bank of {summary['budget']:,} parameters (bank.budget)"
        advice = "use fewer or smaller ensemble.members" if full else "lower bank.budget (or use smaller members)"
        generated = "" if full else f", {summary['slot_weights']:,} generated weights and their gradients"
        raise SuperweightsError(
            f"{what} needs at least {need / 1e9:,.1f} GB to train ({summary['total_params']:,} trainable parameters "
            f"with gradients{' and SGD momentum' if momentum > 0 else ''}{generated}, float32) but this machine has "
            f"{available / 1e9:,.1f} GB available: {advice}"
        )
    return need


def _bank_fits(config: Config, slots: list[SlotSpec]) -> None:
    """`check_memory` on the bank alone (a lower bound of the whole): an SSN layout of a 1e15 budget would
    otherwise spend minutes lifting template counts before the whole summary could be checked."""
    budget = resolve_budget(config.bank.budget, slots)
    weights = sum(s.numel for s in slots)
    check_memory({"method": config.bank.method, "budget": budget, "total_params": budget, "slot_weights": weights},
                 config.train.momentum)


def _summary(config: Config, info: DatasetInfo, plan: Plan | None, check_memory_first: bool = False) -> dict:
    members = meta_members(config, info)
    slots = member_slots(config, info, members)
    if check_memory_first and plan is None and config.bank.method != "full":
        _bank_fits(config, slots)
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

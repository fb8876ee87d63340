"""A config's members and their slots: built for real (`build_members`, seeded) or on the meta device (no
data, no memory: `meta_members`), traced into the `SlotSpec`s a bank plan lays out (`member_slots`),
checked against a saved plan (`check_plan_fits`); and the memory estimate that refuses a run this machine
cannot hold (`check_memory`).

How each bank method turns the slots into a plan, a model and a summary is `ensemble.methods`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from core.errors import SuperweightsError
from core.plan import Plan, SlotSpec, resolve_budget
from core.slots import trace_slots
from core.ssn import SSNPlan

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


def has_convs(config: Config, info: DatasetInfo) -> bool:
    """Whether any member (exit heads included) has a convolution: what a memory format can change."""
    return any(isinstance(m, nn.Conv2d) for member in meta_members(config, info) for m in member.modules())


def member_slots(config: Config, info: DatasetInfo, members: list[nn.Module] | None = None) -> list[SlotSpec]:
    members = members if members is not None else meta_members(config, info)
    x = example_input(info)
    return [
        SlotSpec(i, name, kind, shape)
        for i, m in enumerate(members)
        for name, kind, shape in trace_slots(m, x)
    ]


def build_members(config: Config, info: DatasetInfo) -> tuple[list[nn.Module], list[str]]:
    """The config's members (with exit heads when asked), seeded by `train.seed`."""
    torch.manual_seed(config.train.seed)
    names = list(config.ensemble.members)
    members = [create_model(n, info.in_channels, info.num_classes) for n in names]
    if exits_enabled(config.ensemble.exits):
        example = example_input(info)
        with torch.device("meta"):
            metas = [create_model(n, info.in_channels, info.num_classes) for n in names]
        members = [wrap_with_exits(m, n, config.ensemble.exits, example, info.num_classes, meta)
                   for m, n, meta in zip(members, names, metas)]
    return members, names


def check_plan_fits(plan: Plan | SSNPlan, members: list[nn.Module], names: list[str]) -> None:
    """A plan (e.g. from plan.json) must name existing slots of these members with the same shapes."""
    for slot in plan.slots:
        if slot.member >= len(members):
            raise SuperweightsError(f"the plan has slots of member {slot.member} but the config has {len(members)} members")
        try:
            weight = members[slot.member].get_submodule(slot.name).weight
        except AttributeError:
            raise SuperweightsError(f"the plan does not match the config: {names[slot.member]} has no slot "
                                    f"{slot.name!r} (ensemble.exits changed?)") from None
        if tuple(weight.shape) != tuple(slot.shape):
            raise SuperweightsError(f"the plan does not match the config: {names[slot.member]}.{slot.name} has shape "
                                    f"{tuple(weight.shape)}, the plan says {tuple(slot.shape)}")


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


def check_bank_memory(config: Config, slots: list[SlotSpec]) -> None:
    """`check_memory` on the bank alone (a lower bound of the whole): an SSN layout of a 1e15 budget would
    otherwise spend minutes lifting template counts before the whole summary could be checked."""
    budget = resolve_budget(config.bank.budget, slots)
    weights = sum(s.numel for s in slots)
    check_memory({"method": config.bank.method, "budget": budget, "total_params": budget, "slot_weights": weights},
                 config.train.momentum)

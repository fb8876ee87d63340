"""The bank methods, in one table: `superweights`, `ssn` (NPAS Shapeshifter Networks) and `full`.

`METHODS[config.bank.method]` is a `BankMethod` (`ensemble.bank_method`); every question whose answer
depends on the method is asked of it, and nowhere else:

* `plan(config, info, slots)`: the plan the config lays out over the members' slots (None: no bank);
* `build(config, info, members, names, plan)`: the ensemble on that plan (seeded by `train.seed`);
* `summary(config, slots, plan, counts)`: the method's fields of `plan_summary` (`plan --json`);
* `relayout(config, info, slots, plan)`: a saved plan laid out again, to check it (`ensemble.checkpoint`);
* `plan_type`: what reads plan.json's `bank` (`Plan`, `SSNPlan`, None);
* `start_layout(config)`: where the plan is only learned during training (learned SSN groups), the config
  whose plan describes the run's start; None where the plan is known before training;
* `steps`: when the method's learning steps run during training (`LearningSteps`: gradient-regrouping
  warm-up, coefficient unsharing, pre-training for learned groups). `ensemble.loop` runs them where these
  say, and asks nothing else about the method.

Each method's functions are in its own file (`method_superweights`, `method_ssn`, `method_full`); the table
below says which function answers which question. `make_plan`, `build_ensemble` and `plan_summary` are the
three ways in.
"""

from __future__ import annotations

from core.flops import module_flops
from core.plan import Plan, SlotSpec
from core.ssn import SSNPlan

from .bank_method import FROM_CONFIG, FROM_LEARNED, AnyPlan, BankMethod, Counts, LearningSteps
from .config import Config
from .data import DatasetInfo
from .method_full import full_build, full_summary, reference_init_
from .method_ssn import (
    learns_groups,
    make_ssn_plan,
    ssn_build,
    ssn_method_summary,
    ssn_plan,
    ssn_relayout,
    ssn_start,
    ssn_summary,
)
from .method_superweights import (
    gradient_warmup_epochs,
    superweights_build,
    superweights_plan,
    superweights_relayout,
    superweights_summary,
    unshare_epoch,
)
from .model import StackedEnsemble
from .planning import (
    build_members,
    check_bank_memory,
    check_memory,
    check_plan_fits,
    example_input,
    member_slots,
    meta_members,
)

__all__ = [
    "FROM_CONFIG", "FROM_LEARNED", "METHODS", "AnyPlan", "BankMethod", "Counts", "LearningSteps",
    "build_ensemble", "reference_init_", "make_plan", "make_ssn_plan", "method_of", "plan_summary", "ssn_summary",
]


METHODS: dict[str, BankMethod] = {
    "superweights": BankMethod(
        "superweights", Plan, plan=superweights_plan, build=superweights_build, summary=superweights_summary,
        relayout=superweights_relayout,
        steps=LearningSteps(warmup_epochs=gradient_warmup_epochs, unshare_epoch=unshare_epoch)),
    "ssn": BankMethod(
        "ssn", SSNPlan, plan=ssn_plan, build=ssn_build, summary=ssn_method_summary, relayout=ssn_relayout,
        start_layout=ssn_start, steps=LearningSteps(pretrains=learns_groups)),
    "full": BankMethod(
        "full", None, plan=lambda config, info, slots: None, build=full_build, summary=full_summary,
        relayout=lambda config, info, slots, plan: (None, FROM_CONFIG)),
}


def method_of(config: Config) -> BankMethod:
    return METHODS[config.bank.method]


# -- the ways in ----------------------------------------------------------------------------------------


def make_plan(config: Config, info: DatasetInfo, slots: list[SlotSpec] | None = None) -> AnyPlan:
    """The plan the config lays out (None for `full`), over `slots` (default: the members' traced slots)."""
    return method_of(config).plan(config, info, slots if slots is not None else member_slots(config, info))


def build_ensemble(config: Config, info: DatasetInfo, plan: AnyPlan = None, channels_last: bool = False) -> StackedEnsemble:
    """Build the model the config asks for, on `plan` (e.g. from plan.json; default: the config's own plan);
    seeded by `train.seed` (same seed, same weights). `channels_last`: the convolutions will run in channels_last
    (`Accelerator.channels_last`), so a SuperWeight bank generates its conv weights in that order (a bank loaded
    from a checkpoint keeps the order it was saved with)."""
    method = method_of(config)
    members, names = build_members(config, info)
    if method.has_bank:
        plan = plan if plan is not None else method.plan(config, info, member_slots(config, info))
        check_plan_fits(plan, members, names)
    return method.build(config, info, members, names, plan, channels_last)


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

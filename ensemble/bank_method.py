"""What one entry of the bank-method table (`ensemble.methods.METHODS`) answers: `BankMethod`, the
`LearningSteps` it takes during training, and the `Counts` every plan summary starts from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from core.plan import Plan, SlotSpec
from core.ssn import SSNPlan

from .config import Config
from .data import DatasetInfo
from .model import StackedEnsemble

AnyPlan = Plan | SSNPlan | None

# how `BankMethod.relayout` laid a saved plan out again, for the error that names a mismatch
FROM_CONFIG = "when laid out from config.json"
FROM_LEARNED = "when its learned groups are laid out again"


@dataclass(frozen=True)
class Counts:
    """What every summary reports: the members' rows and parameter counts without a bank."""

    rows: list[dict]  # [{name, params, flops}] per member
    slot_weights: int  # weights of every slot (what a bank generates)
    full: int  # parameters of the full-parameter ensemble
    private: int  # norms, biases: parameters no bank generates


def _none(config: Config) -> int:
    return 0


def _no(config: Config) -> bool:
    return False


@dataclass(frozen=True)
class LearningSteps:
    """When a method learns part of its layout during training. `ensemble.loop` runs the steps and asks only
    this when; the steps themselves (`ensemble.grouping`, `ensemble.ssn_model`) build models, so they sit above
    the table and the table cannot name them. The default: a plan fixed before training, nothing learned."""

    # epochs on the start plan before the plan is learned from slot gradients (gradient regrouping); 0 = none
    warmup_epochs: Callable[[Config], int] = _none
    # training epoch (1-based, counted after the warm-up) after which conflicting coefficients are unshared;
    # 0 = never
    unshare_epoch: Callable[[Config], int] = _none
    # the first epoch's plan is learned by a pre-training before it (learned SSN groups)
    pretrains: Callable[[Config], bool] = _no

    def regroups_after(self, config: Config, epoch: int) -> bool:
        """Is `epoch` (1-based, warm-up included) the last warm-up epoch, after which the plan is regrouped?"""
        warm = self.warmup_epochs(config)
        return bool(warm) and epoch == warm

    def unshares_after(self, config: Config, epoch: int) -> bool:
        """Is `epoch` (1-based, warm-up included) the one after which coefficients are unshared?"""
        at = self.unshare_epoch(config)
        return bool(at) and epoch == self.warmup_epochs(config) + at


@dataclass(frozen=True)
class BankMethod:
    """One bank method; the functions answer for a config whose `bank.method` is `name`."""

    name: str
    plan_type: type | None  # what reads plan.json's `bank` (`Plan`, `SSNPlan`, None: no bank)
    # the plan the config lays out over the members' slots (None: no bank)
    plan: Callable[[Config, DatasetInfo, list[SlotSpec]], AnyPlan]
    # the ensemble on that plan (seeded by `train.seed`); its last argument: whether the convolutions will run in
    # channels_last (a SuperWeight bank then generates channels_last weights; the others ignore it)
    build: Callable[[Config, DatasetInfo, list[nn.Module], list[str], AnyPlan, bool], StackedEnsemble]
    # the method's fields of `plan_summary` (`plan --json`)
    summary: Callable[[Config, list[SlotSpec], AnyPlan, Counts], dict]
    # a saved plan laid out again, to check it (`ensemble.checkpoint`), and how (FROM_CONFIG / FROM_LEARNED)
    relayout: Callable[[Config, DatasetInfo, list[SlotSpec], AnyPlan], tuple[AnyPlan, str]]
    # where the plan is only learned during training, the config whose plan describes the run's start;
    # None where the plan is known before training
    start_layout: Callable[[Config], Config | None] = lambda config: None
    steps: LearningSteps = field(default_factory=LearningSteps)

    @property
    def has_bank(self) -> bool:
        return self.plan_type is not None

"""Planning a comparison: which children (method, budget, seed) `superweights compare` trains, each with the
config it trains under (`plan_children`, `Child`), and each child's plan summary (`child_plan`).

A child's `settings` (its whole config, hashed) is what makes a finished MLflow run reusable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from core.errors import SuperweightsError
from ensemble.config import Config, load_config

METHODS = ("superweights", "full", "members", "ssn-repeat", "ssn-mask", "ssn-inter")
DIGITS_PROTOCOL = ["data.train_per_class=20"]  # with the full split every method scores ~98%


HASHED_EVAL_BATCH = 512  # train.eval_batch_size's default until 2026-12-07


@dataclass(frozen=True)
class Child:
    variant: str  # table label, e.g. "superweights", "full", "member wrn-10-2", "ssn-mask"
    budget: float | None  # budget ratio for bank methods, None for full-parameter ones
    seed: int
    config: Config

    @property
    def settings(self) -> str:
        # [serve] says nothing about training, and leaving it out keeps the hashes of runs logged before it existed
        settings = {k: v for k, v in self.config.to_dict().items() if k != "serve"}
        # nor does the evaluation batch (results do not depend on it): hashed as the 512 every run logged before
        # the automatic batch (0) held, so those runs stay reusable and any batch gives the same hash
        settings["train"] = {**settings["train"], "eval_batch_size": HASHED_EVAL_BATCH}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def plan_children(base_path: str | None, overrides: list[str], budgets: list[float], seeds: int,
                  methods: list[str]) -> list[Child]:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SuperweightsError(f"unknown --methods {unknown[0]!r}; valid: {', '.join(METHODS)}")
    if seeds < 1:
        raise SuperweightsError(f"--seeds must be >= 1, got {seeds}")
    base = load_config(base_path, overrides)
    protocol = DIGITS_PROTOCOL if base.data.name == "digits" and base.data.train_per_class == 0 else []
    ssn = [m for m in methods if m.startswith("ssn-")]
    # Per budget, the SSN variants to train: where the plan upsamples no slot (every group holds at least
    # each of its slots, budget ~0.5 and up on the digits members) repeat, mask and inter are one model,
    # trained once as "ssn-wavg" instead of three times under three names.
    ssn_variants = {b: _ssn_variants(load_config(base_path, [*protocol, *overrides, *NOT_SUPERWEIGHTS,
                                                            "bank.method=ssn", f"bank.budget={float(b)}"]), ssn)
                    for b in budgets}
    children = []
    for seed in range(seeds):
        def make(variant, budget, extra, seed=seed):
            children.append(Child(variant, budget, seed, load_config(base_path, [*protocol, *overrides, *extra,
                                                                                   f"train.seed={seed}"])))
        for b in budgets:
            if "superweights" in methods:
                make(variant_name("superweights", base.bank.grouping, base.bank.unshare_epoch, base.bank.ssn_groups),
                     b, ["bank.method=superweights", f"bank.budget={float(b)}"])
            for m in ssn_variants[b]:
                upsample = "repeat" if m == WAVG_ONLY else m[4:]  # any upsampler: none is used
                make(variant_name(m, ssn_groups=base.bank.ssn_groups), b,
                     [*NOT_SUPERWEIGHTS, "bank.method=ssn", f"bank.upsample={upsample}", f"bank.budget={float(b)}"])
        if "full" in methods:
            make("full", None, [*NOT_SUPERWEIGHTS, "bank.method=full"])
        if "members" in methods:
            for name in base.ensemble.members:
                make(f"member {name}", None, [*NOT_SUPERWEIGHTS, "bank.method=full", f'ensemble.members=["{name}"]'])
    return children


WAVG_ONLY = "ssn-wavg"

# The SuperWeight method's learning steps (`--set bank.grouping=gradient`, `bank.unshare_epoch=N`) apply to the
# superweights children; the other methods' configs refuse them, so their children reset them (the defaults:
# the same settings hash as a child planned without them).
NOT_SUPERWEIGHTS = ("bank.grouping=depth", "bank.unshare_epoch=0")


def variant_name(method: str, grouping: str = "depth", unshare_epoch: int = 0, ssn_groups: str = "depth") -> str:
    """The table label of a bank child: the method, plus the learning steps it trained with, so that runs with
    and without them never share a row (one MLflow store often holds both: `compare --report-only`)."""
    if method.startswith("ssn"):
        return f"{method}, learned groups" if ssn_groups == "learned" else method
    steps = (["gradient grouping"] if grouping == "gradient" else []) + (
        [f"unsharing at epoch {unshare_epoch}"] if unshare_epoch > 0 else [])
    return ", ".join([method, " + ".join(steps)]) if steps else method


def _ssn_variants(config: Config, asked: list[str]) -> list[str]:
    """The asked SSN variants, or ["ssn-wavg"] when more than one was asked and the plan upsamples no slot.
    Learned groups are only known after pre-training, so they always keep every variant."""
    if len(asked) < 2 or config.bank.ssn_groups == "learned":
        return asked
    from ensemble.data import dataset_info
    from ensemble.methods import plan_summary

    return [WAVG_ONLY] if plan_summary(config, dataset_info(config.data))["upsampled_slots"] == 0 else asked


def child_plan(child: Child) -> dict:
    """The child's plan summary; needs the dataset's shape only, not its files (those are the task's business)."""
    from ensemble.data import dataset_info
    from ensemble.methods import plan_summary

    return plan_summary(child.config, dataset_info(child.config.data), before_training=True)

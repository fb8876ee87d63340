"""Learned SSN groups (NPAS / Shapeshifter Networks): the SSN method's learning step, above training.

The SSN method itself (plan, build, summary; `SSNEnsemble` is in `ensemble.model`) is an entry of the
table in `ensemble.methods`. Learned groups (`learned_ssn_groups`) come from a short pre-training whose
per-slot wavg coefficients are clustered with sklearn's KMeans (sklearn lives here, not in core); the
training loop runs it before its first epoch. `build_ssn_ensemble` builds an SSN ensemble from a config
and explicit SSN settings (pre-training first when it asks for learned groups without them).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from core.errors import SuperweightsError
from core.ssn import GROUP_MODES, SSNPlan, build_ssn_plan

from .config import Config
from .data import DatasetInfo
from .methods import build_ensemble, make_ssn_plan
from .model import SSNEnsemble
from .planning import build_members, member_slots
from .training import make_optimizer, train_step


def build_ssn_ensemble(config: Config, info: DatasetInfo, upsample: str = "repeat", groups_mode: str = "depth",
                       n_groups: int = 4, max_templates: int = 4, budget: int | float | None = None,
                       plan: SSNPlan | None = None, groups: list[int] | None = None, data=None,
                       device: str | torch.device = "cpu", pretrain_steps: int = 50) -> SSNEnsemble:
    """An SSN ensemble seeded by `train.seed` (same seed, same weights), on the CPU.

    `plan` (e.g. from plan.json) wins over everything; otherwise the plan is laid out from `upsample`,
    `groups_mode` (one | depth | learned), `max_templates` and `budget` (default `config.bank.budget`).
    `learned` uses `groups` when given, else pre-trains `pretrain_steps` steps on `data` (on `device`)
    and clusters into `n_groups` groups (`learned_ssn_groups`); `depth` uses `config.bank.depth_bins`.
    """
    if groups_mode not in GROUP_MODES:
        raise SuperweightsError(f"SSN groups must be one of {', '.join(GROUP_MODES)}, got {groups_mode!r}")
    if plan is None and groups is None and groups_mode == "learned":
        if data is None:
            raise SuperweightsError("learned SSN groups need training data for their pre-training")
        groups = learned_ssn_groups(config, info, data, device, pretrain_steps, n_groups, max_templates)
    if plan is None:
        plan = make_ssn_plan(config, info, upsample, groups_mode, max_templates, budget, groups)
    ssn = dataclasses.replace(config, bank=dataclasses.replace(config.bank, method="ssn"))
    return build_ensemble(ssn, info, plan)


# -- learned groups --------------------------------------------------------------------------------


def kmeans_groups(embeddings: Tensor | np.ndarray, n_groups: int, seed: int = 0) -> list[int]:
    """KMeans(n_clusters=min(n_groups, n_slots), random_state=seed, n_init=10) labels, renumbered by first
    appearance (deterministic under the seed; every row gets a group)."""
    from sklearn.cluster import KMeans  # here, not at the top: importing sklearn costs ~1 s at start-up

    x = np.asarray(embeddings.detach().cpu().double() if isinstance(embeddings, Tensor) else embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise SuperweightsError(f"embeddings must be a non-empty [n_slots, d] matrix, got shape {x.shape}")
    if n_groups < 1:
        raise SuperweightsError(f"bank.groups must be >= 1, got {n_groups}")
    k = min(n_groups, len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct embeddings than clusters: KMeans warns, still labels all
        labels = KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(x)
    order: dict[int, int] = {}
    return [order.setdefault(int(label), len(order)) for label in labels]


def coefficient_embeddings(model: SSNEnsemble) -> Tensor:
    """[n_slots, max K]: each slot's wavg coefficients, zero-padded to equal length."""
    plan = model.plan
    rows = [model.bank.slot_coefficients(i).detach().cpu() if plan.slot_layout[i].mode == "wavg" else torch.zeros(0)
            for i in range(len(plan.slots))]
    width = max(1, max(r.numel() for r in rows))
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def probe_plan(config: Config, info: DatasetInfo, max_templates: int) -> SSNPlan:
    """The pre-training layout: one group of max_templates x the largest slot, every slot a wavg of exactly
    `max_templates` aligned windows, so coefficient k means the same window position for every slot."""
    slots = member_slots(config, info)
    budget = max_templates * max(s.numel for s in slots)
    return build_ssn_plan(slots, budget, [0] * len(slots), max_templates, "repeat", layout="aligned")


def _cycle(data, steps: int) -> Iterable[tuple[Tensor, Tensor]]:
    loader = getattr(data, "train", data)  # DataSplits or any re-iterable of (x, y) batches
    epoch, done = 0, 0
    while done < steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        got = False
        for batch in loader:
            got = True
            yield batch
            done += 1
            if done >= steps:
                return
        if not got:
            raise SuperweightsError("no training batches for the learned-groups pre-training")
        epoch += 1


def learned_ssn_groups(config: Config, info: DatasetInfo, data, device: str | torch.device = "cpu", steps: int = 50,
                       n_groups: int = 4, max_templates: int | None = None, seed: int | None = None) -> list[int]:
    """Learned SSN groups: pre-train `steps` steps on the probe layout (`probe_plan`, coefficients all
    1/sqrt(K) at init so they only differ by what training taught them), then KMeans on each slot's
    coefficients. Deterministic under `train.seed` (or `seed`) on a deterministic device; covers every slot."""

    if steps < 1:
        raise SuperweightsError(f"the learned-groups pre-training needs >= 1 step, got {steps}")
    seed = config.train.seed if seed is None else seed
    templates = max_templates if max_templates is not None else config.bank.max_templates
    plan = probe_plan(config, info, templates)
    members, names = build_members(config, info)
    model = SSNEnsemble(members, names, info.mean, info.std, plan, torch.Generator().manual_seed(seed),
                        coef_init="uniform", exit_weights=config.ensemble.exit_weights).to(device)
    model.train()
    optimizer, scheduler = make_optimizer(model, config, steps)
    for x, y in _cycle(data, steps):
        train_step(model, x.to(device), y.to(device), optimizer, scheduler)
    return kmeans_groups(coefficient_embeddings(model), n_groups, seed)


def learned_ssn_plan(config: Config, info: DatasetInfo, data, device: str | torch.device = "cpu", steps: int = 50,
                     upsample: str = "repeat", n_groups: int = 4, max_templates: int = 4,
                     budget: int | float | None = None) -> SSNPlan:
    """`learned_ssn_groups` then the SSN plan on those groups (for `build_ssn_ensemble(..., plan=...)`)."""
    groups = learned_ssn_groups(config, info, data, device, steps, n_groups, max_templates)
    return make_ssn_plan(config, info, upsample, "learned", max_templates, budget, groups)

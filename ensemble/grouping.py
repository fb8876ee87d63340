"""The training side of gradient-based grouping and coefficient unsharing (DESIGN.md steps 7-8).

`gradient_regroup`: warm up with depth-bin groups, accumulate every slot's weight gradient over
several training batches (train mode, as training sees them), split groups by similarity, re-plan at
the same exact budget. The caller then builds a fresh, re-initialised model on the new plan.

`unshare_coefficients`: accumulate coefficient gradients per member, give conflicting corresponding
slots their own copy of the coefficients, and carry the optimizer state (momentum) along.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from core.grouping import coefficient_transfer, gradient_plan, unshare_keys
from core.plan import Plan, build_plan

from .config import Config
from .data import DataSplits, Loader
from .model import SuperWeightEnsemble, build_ensemble
from .training import make_optimizer, model_loss, train_epoch


def _batches(loader: Loader, n: int, epoch: int):
    loader.set_epoch(epoch)
    for k, batch in enumerate(loader):
        if k >= n:
            break
        yield batch


def collect_slot_gradients(model: SuperWeightEnsemble, loader: Loader, batches: int, device, epoch: int = 0) -> list[Tensor]:
    """Sum over `batches` training batches of d(loss)/d(slot weight), for every slot."""
    model.train()
    sums: list[Tensor] | None = None
    for x, y in _batches(loader, batches, epoch):
        with torch.no_grad():
            generated = model.bank()
        leaves = [w.detach().requires_grad_() for w in generated]
        with model.using_weights(leaves):
            loss, _ = model_loss(model, x.to(device), y.to(device))
        grads = torch.autograd.grad(loss, leaves)
        sums = list(grads) if sums is None else [s + g for s, g in zip(sums, grads)]
    if sums is None:
        raise ValueError("no training batches to measure gradients on")
    return [s.detach() for s in sums]


def gradient_regroup(config: Config, data: DataSplits, device, log: Callable[[str], None] = print,
                     progress: bool = False) -> Plan:
    """Warm-up on depth groups, then the gradient-based plan (same exact budget)."""
    g = config.grouping
    model = build_ensemble(config, data.info).to(device)
    assert isinstance(model, SuperWeightEnsemble)
    optimizer, scheduler = make_optimizer(model, config, len(data.train), epochs=g.warmup_epochs)
    for epoch in range(g.warmup_epochs):
        row = train_epoch(model, data.train, optimizer, scheduler, device, epoch, progress, f"warm-up {epoch + 1}/{g.warmup_epochs}")
        log(f"warm-up {epoch + 1}/{g.warmup_epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}")
    grads = collect_slot_gradients(model, data.train, g.batches, device, epoch=g.warmup_epochs)
    b = config.bank
    plan, used = gradient_plan(model.plan, grads, g.threshold, g.threshold_step, g.tries, b.depth_bins, b.share_coefficients)
    log(f"gradient grouping: {len(model.plan.groups)} depth groups -> {len(plan.groups)} groups "
        f"at threshold {used:.3g} ({len(plan.blocks)} blocks, budget {plan.bank_params:,} exact)")
    return plan


def per_member_coefficient_gradients(model: SuperWeightEnsemble, loader: Loader, batches: int, device,
                                     epoch: int) -> list[Tensor]:
    """Gradient of each member's own loss w.r.t. the flat coefficient vector, summed over batches."""
    model.train()
    m = len(model.members)
    sums = [torch.zeros_like(model.bank.coefficients) for _ in range(m)]
    for x, y in _batches(loader, batches, epoch):
        x, y = x.to(device), y.to(device)
        for i in range(m):
            loss, _ = model_loss(model, x, y, members=[i])
            (grad,) = torch.autograd.grad(loss, model.bank.coefficients)
            sums[i] += grad
    return sums


def _swap_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, index: Tensor) -> None:
    """Put `new` where `old` was in the optimizer; its state is the old state gathered by `index`."""
    for group in optimizer.param_groups:
        for k, p in enumerate(group["params"]):
            if p is old:
                group["params"][k] = new
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {k: (v[index].clone() if torch.is_tensor(v) and v.shape == old.shape else v)
                                for k, v in state.items()}


def unshare_coefficients(model: SuperWeightEnsemble, optimizer: torch.optim.Optimizer, loader: Loader,
                         config: Config, device, epoch: int) -> int:
    """Split corresponding slots whose coefficient gradients conflict; returns how many slot pairs stopped sharing."""
    b = config.bank
    old_plan = model.plan
    grads = per_member_coefficient_gradients(model, loader, b.unshare_batches, device, epoch)
    keys = unshare_keys(old_plan, grads, b.unshare_threshold)
    new_plan = build_plan(old_plan.slots, old_plan.budget, b.depth_bins, old_plan.max_templates,
                          b.share_coefficients, group_of=old_plan.slot_group, coef_of=keys)
    index = coefficient_transfer(old_plan, new_plan).to(model.bank.coefficients.device)
    old = model.bank.coefficients
    new = nn.Parameter(old.detach()[index].clone())
    _swap_parameter(optimizer, old, new, index)
    model.bank.rebind(new_plan, new)
    model.plan = new_plan
    return shared_pairs(old_plan) - shared_pairs(new_plan)


def shared_pairs(plan: Plan) -> int:
    """Number of slot pairs that share a coefficient set."""
    counts: dict[int, int] = {}
    for c in plan.slot_coef:
        counts[c] = counts.get(c, 0) + 1
    return sum(n * (n - 1) // 2 for n in counts.values())


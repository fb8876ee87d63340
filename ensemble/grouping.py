"""The training side of gradient-based grouping and coefficient unsharing (DESIGN.md steps 7-8).

Both are phases of the one training loop (`ensemble.loop`), on every worker layout:

* `regroup_plan`: after the warm-up epochs on depth-bin groups, accumulate every slot's weight gradient
  over several training batches (train mode, as training sees them), split groups by similarity and
  re-plan at the same exact budget; the loop then builds a fresh, re-initialised model on the new plan.
* `unshare_coefficients`: accumulate coefficient gradients per member, give conflicting corresponding
  slots their own copy of the coefficients, and carry the optimizer state (momentum) along.

Gradients are measured per worker (its members, its slice of each batch, through `comm.view` so a
replica's slice weighs what it weighs in the full batch) and summed over workers with `comm.sum_`: every
worker then holds the gradients one process would have measured, and makes the same plan.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from core.grouping import coefficient_transfer, gradient_plan, unshare_keys
from core.plan import Plan, build_plan

from .collective import Collective
from .config import Config
from .data import Loader
from .model import SuperWeightEnsemble
from .training import model_loss


def _batches(loader: Loader, n: int, epoch: int):
    loader.set_epoch(epoch)
    for k, batch in enumerate(loader):
        if k >= n:
            break
        yield k, batch


def _summed(parts: list[Tensor], comm: Collective) -> list[Tensor]:
    """Sum a list of tensors over workers in ONE collective."""
    if comm.world == 1:
        return parts
    flat = comm.sum_(torch.cat([p.reshape(-1) for p in parts]))
    return [t.view_as(p) for t, p in zip(torch.split(flat, [p.numel() for p in parts]), parts)]


def collect_slot_gradients(model: SuperWeightEnsemble, loader: Loader, batches: int, device, epoch: int = 0,
                           comm: Collective | None = None) -> list[Tensor]:
    """Sum over `batches` training batches of d(loss)/d(slot weight), for every slot (all workers' members)."""
    comm = comm or _single(model)
    with measuring(model):
        return _collect_slot_gradients(model, loader, batches, device, epoch, comm)


def _collect_slot_gradients(model, loader, batches, device, epoch, comm) -> list[Tensor]:
    model.train()
    sums: list[Tensor] | None = None
    for step, (x, y) in _batches(loader, batches, epoch):
        comm.begin(step, y)
        with torch.no_grad():
            generated = model.bank()
        leaves = [w.detach().requires_grad_() for w in generated]
        with model.using_weights(leaves):
            loss, _ = model_loss(comm.view, x.to(device), y.to(device), comm.members)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        # Slots of other workers' members get no gradient here; an empty slice contributes nothing.
        grads = [torch.zeros_like(w) if g is None or len(y) == 0 else g for g, w in zip(grads, leaves)]
        sums = list(grads) if sums is None else [s + g for s, g in zip(sums, grads)]
    if sums is None:
        raise ValueError("no training batches to measure gradients on")
    return _summed([s.detach() for s in sums], comm)


def regroup_plan(model: SuperWeightEnsemble, loader: Loader, config: Config, device, epoch: int,
                 comm: Collective | None = None) -> tuple[Plan, float]:
    """The gradient-based plan (same exact budget) from the warmed-up `model`; (plan, threshold used)."""
    g, b = config.grouping, config.bank
    grads = collect_slot_gradients(model, loader, g.batches, device, epoch, comm)
    return gradient_plan(model.plan, grads, g.threshold, g.threshold_step, g.tries, b.depth_bins, b.share_coefficients)


@contextmanager
def measuring(model: nn.Module):
    """Train-mode forwards that only measure gradients: batch-norm running statistics are put back
    afterwards, so a measurement leaves the model exactly as training left it (and a worker's copy of
    another member group's statistics cannot go stale)."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(model.buffers(), saved):
                b.copy_(v)


def per_member_coefficient_gradients(model: SuperWeightEnsemble, loader: Loader, batches: int, device,
                                     epoch: int, comm: Collective | None = None) -> list[Tensor]:
    """Gradient of each member's own loss w.r.t. the flat coefficient vector, summed over batches (and workers)."""
    comm = comm or _single(model)
    with measuring(model):
        return _per_member_coefficient_gradients(model, loader, batches, device, epoch, comm)


def _per_member_coefficient_gradients(model, loader, batches, device, epoch, comm) -> list[Tensor]:
    model.train()
    m = len(model.members)
    mine = range(m) if comm.members is None else comm.members
    sums = [torch.zeros_like(model.bank.coefficients) for _ in range(m)]
    for step, (x, y) in _batches(loader, batches, epoch):
        comm.begin(step, y)
        x, y = x.to(device), y.to(device)
        for i in mine:
            loss, _ = model_loss(comm.view, x, y, members=[i])
            (grad,) = torch.autograd.grad(loss, model.bank.coefficients, allow_unused=True)
            if grad is not None and len(y):
                sums[i] += grad
    return _summed(sums, comm)


def _single(model: nn.Module) -> Collective:
    comm = Collective()
    comm.attach(model)
    return comm


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
                         config: Config, device, epoch: int, comm: Collective | None = None) -> int:
    """Split corresponding slots whose coefficient gradients conflict; returns how many slot pairs stopped sharing.
    After it the model has a new coefficient Parameter: re-`attach` it to the collective."""
    b = config.bank
    old_plan = model.plan
    grads = per_member_coefficient_gradients(model, loader, b.unshare_batches, device, epoch, comm)
    keys = unshare_keys(old_plan, grads, b.unshare_threshold)
    new_plan = build_plan(old_plan.slots, old_plan.budget, b.depth_bins, old_plan.max_templates,
                          b.share_coefficients, group_of=old_plan.slot_group, coef_of=keys)
    index = coefficient_transfer(old_plan, new_plan).to(model.bank.coefficients.device)
    old = model.bank.coefficients
    new = nn.Parameter(old.detach()[index].clone())
    _swap_parameter(optimizer, old, new, index)
    model.bank.rebind(new_plan, new)
    bank = model.bank.bank  # re-stored for the new classes' matmuls, its optimizer state moved alike
    model.bank.restore(*(v for v in optimizer.state.get(bank, {}).values() if torch.is_tensor(v) and v.shape == bank.shape))
    model.plan = new_plan
    return shared_pairs(old_plan) - shared_pairs(new_plan)


def shared_pairs(plan: Plan) -> int:
    """Number of slot pairs that share a coefficient set."""
    counts: dict[int, int] = {}
    for c in plan.slot_coef:
        counts[c] = counts.get(c, 0) + 1
    return sum(n * (n - 1) // 2 for n in counts.values())


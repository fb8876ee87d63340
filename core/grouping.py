"""Gradient-based SuperWeight grouping and coefficient unsharing: the partition logic (DESIGN.md 7-8).

Pure functions on gradients and plans; the training side (warm-up, accumulating gradients,
swapping optimizer state) lives in `ensemble/grouping.py`.

* Merging is a union-find over the graph "cosine similarity > threshold": the partition is the set of
  connected components, so it does not depend on the order of the inputs and is transitive; a
  higher threshold removes edges and therefore never gives fewer groups.
* Re-planning keeps the budget exact; if the finer grouping needs more blocks than the budget has
  parameters, the threshold is lowered in bounded steps, then a one-line error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import BudgetTooSmallError, SuperweightsError
from .plan import Plan, build_plan


def components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """Connected components by union-find; label = smallest index in the component (canonical)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def cropped_cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two weight-shaped tensors over their common top-left block [:O, :I]."""
    o, i = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    va = a[:o, :i].reshape(-1).double()
    vb = b[:o, :i].reshape(-1).double()
    denom = va.norm() * vb.norm()
    return float(va @ vb / denom) if denom > 0 else 0.0


def similarity_matrix(vectors: list[Tensor]) -> Tensor:
    n = len(vectors)
    sim = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = cropped_cosine(vectors[i], vectors[j])
    return sim


def partition(sim: Tensor, threshold: float) -> list[int]:
    """Labels of the components of the graph with an edge wherever similarity > threshold."""
    n = sim.shape[0]
    return components(n, [(i, j) for i in range(n) for j in range(i + 1, n) if sim[i, j] > threshold])


def regroup_keys(plan: Plan, sims: dict[int, Tensor], threshold: float) -> list[tuple[int, int]]:
    """New group key (old group, component) of every slot; `sims[g]` is over `plan.groups[g].slots`."""
    keys: list[tuple[int, int]] = [(-1, -1)] * len(plan.slots)
    for g in plan.groups:
        labels = partition(sims[g.id], threshold)
        for pos, slot in enumerate(g.slots):
            keys[slot] = (g.id, labels[pos])
    return keys


def gradient_plan(plan: Plan, slot_grads: list[Tensor], threshold: float, step: float, tries: int,
                  depth_bins: int, share_coefficients: bool) -> tuple[Plan, float]:
    """Split the plan's groups by gradient similarity and re-plan at the same exact budget.

    Returns the new plan and the threshold that fitted. Lowers the threshold by `step` up to `tries`
    times when the finer grouping cannot fit the budget (one parameter per block), then raises.
    """
    sims = {g.id: similarity_matrix([slot_grads[i] for i in g.slots]) for g in plan.groups}
    t = threshold
    last: BudgetTooSmallError | None = None
    for _ in range(max(1, tries)):
        keys = regroup_keys(plan, sims, t)
        try:
            new = build_plan(plan.slots, plan.budget, depth_bins, plan.max_templates, share_coefficients, group_of=keys)
            return new, t
        except BudgetTooSmallError as e:
            last = e
            t -= step
    raise SuperweightsError(
        f"no gradient grouping fits bank.budget={plan.budget}: tried grouping.threshold from {threshold} down to "
        f"{t + step:.3g}; the last grouping needs at least {last.minimum if last else '?'} parameters "
        f"(raise bank.budget, lower grouping.threshold or allow more grouping.tries)"
    )


def unshare_keys(plan: Plan, coef_grads_per_member: list[Tensor], threshold: float) -> list[tuple]:
    """New coefficient-set key per slot after unsharing (DESIGN.md step 8).

    `coef_grads_per_member[m]` is the gradient of member m's loss w.r.t. the flat coefficient vector.
    Slots sharing a coefficient set are compared over the coefficient rows of the blocks both use;
    pairs whose cosine is below `threshold` stop sharing (components of the "similar" graph keep
    sharing).
    """
    by_set: dict[int, list[int]] = {}
    for i, c in enumerate(plan.slot_coef):
        by_set.setdefault(c, []).append(i)
    keys: list[tuple] = [()] * len(plan.slots)
    for c, ids in by_set.items():
        vecs = [_slot_coef_grad(plan, i, coef_grads_per_member[plan.slots[i].member]) for i in ids]
        n = len(ids)
        edges = []
        for a in range(n):
            for b in range(a + 1, n):
                common = sorted(set(vecs[a]) & set(vecs[b]))
                va = torch.cat([vecs[a][k] for k in common]).double()
                vb = torch.cat([vecs[b][k] for k in common]).double()
                denom = va.norm() * vb.norm()
                cos = float(va @ vb / denom) if denom > 0 else 1.0
                if cos >= threshold:
                    edges.append((a, b))
        labels = components(n, edges)
        for pos, slot in enumerate(ids):
            keys[slot] = (c, labels[pos])
    return keys


def _slot_coef_grad(plan: Plan, slot: int, grad: Tensor) -> dict[int, Tensor]:
    """block id -> the slot's coefficient-row gradient in that block."""
    c = plan.slot_coef[slot]
    out = {}
    for row in plan.slot_cells(slot):
        for bid in row:
            b = plan.blocks[bid]
            r = b.coef_sets.index(c)
            start = b.coef_offset + r * b.templates
            out[bid] = grad[start : start + b.templates]
    return out


def coefficient_transfer(old: Plan, new: Plan) -> Tensor:
    """Index into the old flat coefficient vector for every entry of the new one.

    Each new coefficient set inherits the values (and optimizer state) of the old set its slots came from.
    """
    index = torch.empty(new.coefficient_params, dtype=torch.long)
    for nb, ob in zip(new.blocks, old.blocks):
        for r, c in enumerate(nb.coef_sets):
            slot = new.slot_coef.index(c)
            old_row = ob.coef_sets.index(old.slot_coef[slot])
            dst = nb.coef_offset + r * nb.templates
            src = ob.coef_offset + old_row * ob.templates
            index[dst : dst + nb.templates] = torch.arange(src, src + ob.templates)
    return index


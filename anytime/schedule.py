"""Schedules (DESIGN.md step 10): the order of the steps; a budget cut runs the longest prefix that fits.

`[anytime] schedule` in the config names one of `SCHEDULERS` (the names of `ensemble.config.SCHEDULES`,
checked when the config loads; a test keeps the two equal): `member` (member-major), `explicit`
(`[anytime] order`, a member index per step) or `greedy` (at each point the step with the largest
validation-accuracy gain per FLOP). Every schedule runs each exit of each member once, in order per member.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from core.errors import SuperweightsError
from ensemble.metrics import accuracy

from .combine import LatestExits
from .costs import Step


def member_major(num_exits: list[int]) -> list[Step]:
    """Every exit of member 0, then of member 1, ..."""
    return [(m, k) for m, e in enumerate(num_exits) for k in range(e)]


def explicit_schedule(order: Sequence[int], num_exits: list[int]) -> list[Step]:
    """Member index per step; each member must appear exactly as many times as it has exits."""
    counts = [0] * len(num_exits)
    steps = []
    for m in order:
        if not 0 <= m < len(num_exits):
            raise SuperweightsError(f"anytime.order: member index {m} does not exist (members 0..{len(num_exits) - 1})")
        steps.append((m, counts[m]))
        counts[m] += 1
    if counts != list(num_exits):
        raise SuperweightsError(f"anytime.order must name each member once per exit (exits per member {list(num_exits)}), "
                                f"got counts {counts}")
    return steps


def greedy_schedule(exit_probs: list[Tensor], labels: Tensor, flops: list[list[int]]) -> list[Step]:
    """At each point take the step (advance one member) with the largest validation accuracy gain per FLOP.

    exit_probs[m]: (N, E_m, C) validation probabilities of every exit of member m. Ties: fewer FLOPs,
    then lower member index (deterministic).
    """
    next_exit = [0] * len(exit_probs)
    latest = LatestExits()
    current = 0.0
    steps = []
    while any(next_exit[m] < p.shape[1] for m, p in enumerate(exit_probs)):
        best = None
        for m, p in enumerate(exit_probs):
            k = next_exit[m]
            if k >= p.shape[1]:
                continue
            acc = accuracy(latest.with_exit(m, p[:, k]).probs(), labels)
            key = ((acc - current) / max(flops[m][k], 1), -flops[m][k], -m)
            if best is None or key > best[0]:
                best = (key, m, k, acc)
        _, m, k, acc = best
        steps.append((m, k))
        latest.update(m, exit_probs[m][:, k])
        next_exit[m] += 1
        current = acc
    return steps


def _greedy(order, exit_probs, labels, flops):
    if exit_probs is None:
        raise SuperweightsError("a greedy schedule needs validation data")
    return greedy_schedule(exit_probs, labels, flops)


SCHEDULERS: dict[str, Callable[..., list[Step]]] = {
    "greedy": _greedy,
    "member": lambda order, exit_probs, labels, flops: member_major([len(f) for f in flops]),
    "explicit": lambda order, exit_probs, labels, flops: explicit_schedule(order, [len(f) for f in flops]),
}


def make_schedule(kind: str, order: Sequence[int], exit_probs: list[Tensor] | None, labels: Tensor | None,
                  flops: list[list[int]]) -> list[Step]:
    """The `kind` schedule over members whose steps cost `flops` (`[m][k]`); greedy needs `exit_probs`/`labels`
    (validation data, as `anytime.record.exit_probabilities`)."""
    return SCHEDULERS[kind](order, exit_probs, labels, flops)

"""Budgeted anytime predictor (DESIGN.md step 10).

Runs the longest prefix of the schedule that fits a `Budget` (`anytime.budget`: FLOPs and/or a latency
deadline), step by step: a step advances one member to its next exit and reuses that member's trunk state, so
a member's stem and stages run once however many of its exits are used. Prediction after a prefix = the
combiner (`anytime.combine`) on each started member's latest exit. Inference uses materialised weights
(`model.materialize()`), so weight generation is not part of the cost.

FLOPs are per image (as measured by `FlopCounterMode` on a batch of one); a batch of B images costs B
times as much, the budget is compared with per-image FLOPs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.exits import as_steps
from ensemble.model import StackedEnsemble

from .budget import Budget, budget_of
from .combine import LatestExits
from .costs import Step, cumulative_flops
from .record import record_steps


@dataclass
class Prediction:
    probs: Tensor  # (B, C) ensemble class probabilities
    steps: list[Step]  # (member, exit) run, in order
    flops: int  # per-image FLOPs spent (sum of the steps' FLOPs)
    elapsed_ms: float  # wall time of the steps (normalisation and combination included)
    deadline_met: bool | None = None  # None without a deadline
    member_probs: dict[int, Tensor] = field(default_factory=dict)  # started member -> latest exit (B, C)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AnytimePredictor:
    def __init__(self, model: StackedEnsemble, record: dict, device: str | torch.device | None = None):
        self.model = model.materialize().eval()
        self.device = torch.device(device) if device is not None else self.model.mean.device
        self.model.to(self.device)
        self.members = [as_steps(m) for m in self.model.members]
        self.steps = record_steps(record)
        self.step_flops = [record["step_flops"][m][k] for m, k in self.steps]
        self.cumulative_flops = cumulative_flops(record["step_flops"], self.steps)
        self._times: dict[tuple, list[float]] = {}

    @classmethod
    def from_checkpoint(cls, ckpt, device=None) -> AnytimePredictor:
        return cls(ckpt.model, ckpt.record, device)

    @property
    def min_flops(self) -> int:
        return self.step_flops[0]

    def prefix_for_budget(self, budget_flops: int | float | None) -> int:
        """Length of the longest schedule prefix whose cumulative FLOPs do not exceed the budget."""
        if budget_flops is None:
            return len(self.steps)
        if budget_flops < self.min_flops:
            raise SuperweightsError(f"FLOPs budget {budget_flops:,.0f} is below the first step's cost; "
                                    f"the minimum budget is {self.min_flops:,} FLOPs per image")
        return sum(1 for c in self.cumulative_flops if c <= budget_flops)

    @torch.no_grad()
    def calibrate(self, x: Tensor, repeats: int = 5) -> list[float]:
        """Measured milliseconds of every step on inputs shaped like `x` (median of `repeats`), cached."""
        key = (tuple(x.shape), x.dtype, str(self.device))
        if key not in self._times:
            runs = [self._run(x, len(self.steps), None, timed=True)[1] for _ in range(repeats + 1)][1:]
            self._times[key] = [statistics.median(r[i] for r in runs) for i in range(len(self.steps))]
        return self._times[key]

    def _run(self, x: Tensor, limit: int, deadline_ms: float | None, timed: bool = False,
             times: list[float] | None = None):
        """Run up to `limit` steps; with a deadline stop before a step whose measured time cannot fit."""
        x = x.to(self.device)
        _sync(self.device)
        start = time.perf_counter()
        h0 = self.model.normalize(x)
        state: dict[int, Tensor] = {}
        latest = LatestExits()
        done, step_ms = [], []
        for i in range(limit):
            m, k = self.steps[i]
            if deadline_ms is not None and i > 0:
                _sync(self.device)
                now = (time.perf_counter() - start) * 1e3
                if now + times[i] > deadline_ms:
                    break
            t0 = time.perf_counter()
            state[m], logits = self.members[m].advance(state.get(m, h0), k)
            latest.update(m, logits.float().softmax(-1))
            if timed:
                _sync(self.device)
                step_ms.append((time.perf_counter() - t0) * 1e3)
            done.append((m, k))
        probs = latest.probs()
        _sync(self.device)
        elapsed = (time.perf_counter() - start) * 1e3
        return (done, latest.latest, probs, elapsed), step_ms

    @torch.no_grad()
    def predict(self, x: Tensor, budget_flops: int | float | None = None, deadline_ms: float | None = None, *,
                budget: Budget | None = None) -> Prediction:
        """Class probabilities after the longest schedule prefix within `budget` (what the server passes), or
        within the shortcuts `budget_flops` (per image) and/or `deadline_ms` (a budget built by `budget_of`).

        The first step always runs (a FLOPs budget below it is an error naming the minimum); under a
        deadline a later step starts only if its measured time fits; `deadline_met` reports the outcome.
        """
        if budget is None:
            budget = budget_of(flops=budget_flops, ms=deadline_ms)
        elif budget_flops is not None or deadline_ms is not None:
            raise TypeError("predict: pass either budget or budget_flops/deadline_ms, not both")
        limit = self.prefix_for_budget(budget.max_flops)
        deadline = budget.deadline_ms
        times = self.calibrate(x) if deadline is not None else None
        (done, latest, probs, elapsed), _ = self._run(x, limit, deadline, times=times)
        flops = sum(self.step_flops[: len(done)])
        return Prediction(probs=probs, steps=done, flops=flops, elapsed_ms=elapsed,
                          deadline_met=None if deadline is None else elapsed <= deadline,
                          member_probs=latest)

"""Budgeted anytime predictor (DESIGN.md step 10).

Runs the longest prefix of the schedule that fits a `Budget` (`anytime.budget`: FLOPs and/or a latency
deadline), step by step: a step advances one member to its next exit and reuses that member's trunk state, so
a member's stem and stages run once however many of its exits are used. Prediction after a prefix = the
record's combiner (`anytime.combine.Combiner`: tempered exits, per-prefix mix, calibration; the plain mean of
the started members' latest exits for records without fitted parts). Inference uses materialised weights
(`model.materialize()`), so weight generation is not part of the cost.

Per-input early exit (`{"mean_flops": F}`, `{"confidence": c}`; `anytime.early_exit`): after each step the
inputs whose confidence is above the level stop, and only the still-running rows are advanced (their trunk
states and tempered exits are sliced down), so a stopped input's probabilities are the
ones the fixed prefix of its length gives, computed by the same operations.

FLOPs are per image (as measured by `FlopCounterMode` on a batch of one); a batch of B images costs B
times as much, the budget is compared with per-image FLOPs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.exits import as_steps
from ensemble.model import StackedEnsemble

from .budget import Budget, budget_of
from .combine import Combiner
from .costs import Step, cumulative_flops
from .early_exit import choose, confidence
from .record import record_steps


@dataclass
class Prediction:
    probs: Tensor  # (B, C) ensemble class probabilities
    steps: list[Step]  # (member, exit) run, in order (by the images that ran longest)
    flops: int  # per-image FLOPs of the images that ran longest (of every image without early exit)
    elapsed_ms: float  # wall time of the steps (normalisation and combination included)
    deadline_met: bool | None = None  # None without a deadline
    image_steps: list[int] | None = None  # schedule steps each image ran (its prefix length)
    image_flops: list[int] | None = None  # per-image FLOPs of each image
    level: float | None = None  # the early-exit confidence level (None: one fixed prefix for every image)


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
        self.combiner = Combiner.from_record(record, self.steps)
        early = record.get("early_exit") or {}
        self.score: str = early.get("score", "max_prob")
        self.table: list[dict] | None = early.get("table")
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

    def level_for(self, mean_flops: float) -> dict:
        """The early-exit table entry fitted for at most `mean_flops` per image on average (`early_exit.choose`)."""
        if not self.table:
            raise SuperweightsError("this model's anytime record has no early-exit thresholds (no validation data "
                                    'when it was written): mean_flops budgets are unavailable; use {"confidence": c} '
                                    'or {"flops": F}')
        entry = choose(self.table, mean_flops)
        if entry is None:
            raise SuperweightsError(f"mean_flops budget {mean_flops:,.0f} is below the first step's cost; the minimum "
                                    f"is {self.min_flops:,} FLOPs per image")
        return entry

    def exit_level(self, budget: Budget) -> float | None:
        """The confidence level of a budget (None: a fixed prefix); SuperweightsError if it cannot be met."""
        if budget.mean_flops_target is not None:
            return float(self.level_for(budget.mean_flops_target)["confidence"])
        return budget.exit_confidence

    def check_budget(self, budget: Budget) -> None:
        """One-line SuperweightsError unless `budget` can be run (what a server answers 422)."""
        self.prefix_for_budget(budget.max_flops)
        self.exit_level(budget)

    @torch.no_grad()
    def calibrate(self, x: Tensor, repeats: int = 5) -> list[float]:
        """Measured milliseconds of every step on inputs shaped like `x` (median of `repeats`), cached."""
        key = (tuple(x.shape), x.dtype, str(self.device))
        if key not in self._times:
            self._times[key] = self._measure(x, repeats)[0]
        return self._times[key]

    def _measure(self, x: Tensor, repeats: int, choices: list[list] | None = None) -> list[list[float]]:
        """Milliseconds of every step on `x` (median of `repeats` runs after one discarded warm-up run) for each
        list of step-wise members in `choices` (default: the one `_members_for` gives), their runs interleaved
        so that machine noise and cache state hit them alike."""
        choices = choices if choices is not None else [self._members_for(len(x))]
        runs: list[list[list[float]]] = [[] for _ in choices]
        for _ in range(repeats + 1):
            for members, out in zip(choices, runs):
                out.append(self._run(x, len(self.steps), None, timed=True, members=members)[1])
        return [[statistics.median(r[i] for r in out[1:]) for i in range(len(self.steps))] for out in runs]

    def _members_for(self, batch: int) -> list:
        """The step-wise members that run a batch of `batch` images (the serving predictor picks a layout)."""
        return self.members

    def _run(self, x: Tensor, limit: int, deadline_ms: float | None, timed: bool = False,
             times: list[float] | None = None, level: float | None = None, members: list | None = None):
        """Run up to `limit` steps; with a deadline stop before a step whose measured time cannot fit; with a
        `level`, rows whose confidence is above it stop after each step (only the others go on). `members`:
        the step-wise members to run (default `_members_for(len(x))`, kept when early exit shrinks the batch).
        Returns ((steps done, probs (B, C), steps per image (B,), elapsed ms), per-step ms when `timed`)."""
        members = members if members is not None else self._members_for(len(x))
        x = x.to(self.device)
        _sync(self.device)
        start = time.perf_counter()
        h0 = self.model.normalize(x)
        comb = self.combiner
        state: dict[int, Tensor] = {}
        tempered: dict[int, Tensor] = {}
        out = rows = image_steps = None  # early exit: results so far, the still-running rows
        done, step_ms = 0, []
        for i in range(limit):
            m, k = self.steps[i]
            if deadline_ms is not None and i > 0:
                _sync(self.device)
                now = (time.perf_counter() - start) * 1e3
                if now + times[i] > deadline_ms:
                    break
            t0 = time.perf_counter()
            state[m], logits = members[m].advance(state.get(m, h0), k)
            tempered[i] = comb.temper(i, logits)
            if timed:
                _sync(self.device)
                step_ms.append((time.perf_counter() - t0) * 1e3)
            done = i + 1
            if level is None or i == limit - 1:
                continue
            p = comb.probs(i, tempered)
            stop = confidence(p, self.score) > level
            if not bool(stop.any()):
                continue
            if out is None:
                out = torch.empty_like(p)
                rows = torch.arange(len(p), device=p.device)
                image_steps = torch.zeros(len(p), dtype=torch.long)
            out[rows[stop]] = p[stop]
            image_steps[rows[stop].cpu()] = done
            keep = ~stop
            rows = rows[keep]
            if not len(rows):
                break
            h0 = h0[keep]
            state = {q: s[keep] for q, s in state.items()}
            tempered = {j: t[keep] for j, t in tempered.items()}
        if out is None:
            out = comb.probs(done - 1, tempered)
            image_steps = torch.full((len(x),), done, dtype=torch.long)
        elif len(rows):
            out[rows] = comb.probs(done - 1, tempered)
            image_steps[rows.cpu()] = done
        _sync(self.device)
        elapsed = (time.perf_counter() - start) * 1e3
        return (done, out, image_steps, elapsed), step_ms

    @torch.no_grad()
    def predict(self, x: Tensor, budget_flops: int | float | None = None, deadline_ms: float | None = None, *,
                budget: Budget | None = None) -> Prediction:
        """Class probabilities after the longest schedule prefix within `budget` (what the server passes), or
        within the shortcuts `budget_flops` (per image) and/or `deadline_ms` (a budget built by `budget_of`).

        Per-input early exit for `MeanFlopsBudget` / `ConfidenceBudget` (`image_steps`, `image_flops` per image).
        The first step always runs (a FLOPs budget below it is an error naming the minimum); under a
        deadline a later step starts only if its measured time fits; `deadline_met` reports the outcome.
        """
        if budget is None:
            budget = budget_of(flops=budget_flops, ms=deadline_ms)
        elif budget_flops is not None or deadline_ms is not None:
            raise TypeError("predict: pass either budget or budget_flops/deadline_ms, not both")
        limit = self.prefix_for_budget(budget.max_flops)
        level = self.exit_level(budget)
        deadline = budget.deadline_ms
        times = self.calibrate(x) if deadline is not None else None
        (done, probs, image_steps, elapsed), _ = self._run(x, limit, deadline, times=times, level=level)
        cum, counts = self.cumulative_flops, image_steps.tolist()
        longest = max(counts)
        return Prediction(probs=probs, steps=self.steps[:longest], flops=cum[longest - 1], elapsed_ms=elapsed,
                          deadline_met=None if deadline is None else elapsed <= deadline, image_steps=counts,
                          image_flops=[cum[c - 1] for c in counts], level=level)

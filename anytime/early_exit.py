"""Per-input early exit (issue 15, item 1; MSDNet's budgeted batch classification, SDN's confidence exits).

After schedule step i (not the last) an input stops when its *confidence* in prefix i's ensemble probabilities
(the record's `anytime.combine.Combiner`, calibrated) is strictly above the threshold; the last step stops every
input. Confidence (`early_exit.score` in anytime.json): `max_prob` (the largest probability, the default) or
`entropy` (`exp(-H)`, H the entropy in nats); both lie in (0, 1], so a threshold of 1 never stops early (the
result is the full schedule) and 0 stops every input after the first step. Strictly above: a saturated
float32 softmax reaches exactly 1.0, and "1 = never confident" must hold for it too.

**Threshold rule**: one confidence level c for every step (the prefixes are calibrated, so one level means the
same confidence at every step). Fitted on the validation split as a table (`early_exit.table` in anytime.json):
for `POINTS` target mean FLOPs F evenly spaced from the first step's to the full schedule's, c is the largest
validation score (or 0/1) whose validation mean FLOPs per image stays <= F even with every score lowered by
`MARGIN` (the predictor recomputes the probabilities batch by batch, a float32 rounding error apart from the
ones fitted on: the margin keeps such differences from pushing the mean above F). A `{"mean_flops": F}` request
takes the entry that spends the most within F (`choose`): on the validation data the thresholds were fitted on,
the mean FLOPs per image never exceed F, and no single image ever spends more than the full schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ensemble.config import EXIT_SCORES as SCORES  # `anytime.exit_score` in the config picks one

POINTS = 64
MARGIN = 1e-5  # confidence units: recomputed float32 probabilities differ by ~1e-7


def confidence(probs: Tensor, score: str = "max_prob") -> Tensor:
    """`(N, C)` probabilities -> `(N,)` confidence in (0, 1] (see the module docstring)."""
    if score == "max_prob":
        return probs.max(-1).values
    if score == "entropy":
        plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-45).log(), torch.zeros_like(probs))
        return plogp.sum(-1).exp()  # exp(-H)
    raise ValueError(f"unknown confidence score {score!r} (one of {', '.join(SCORES)})")


def steps_run(scores: Tensor, level: float) -> Tensor:
    """`(N,)` steps each input runs (1..n) at one confidence `level`; `scores` `(N, n)`: confidence per prefix."""
    stop = torch.cat([scores[:, :-1] > level, torch.ones_like(scores[:, :1], dtype=torch.bool)], 1)
    return stop.to(torch.int8).argmax(1) + 1  # the first True


def simulate(scores: Tensor, correct: Tensor, cumulative: Tensor, level: float) -> tuple[float, float, float]:
    """(mean FLOPs per image, accuracy, mean steps) of `level` on prefix scores and correctness `(N, n)`."""
    n = steps_run(scores, level)
    k = n - 1
    return (float(cumulative[k].double().mean()), float(correct.gather(1, k[:, None]).double().mean()),
            float(n.double().mean()))


def _bound(scores: Tensor, cumulative: Tensor, level: float) -> float:
    """Validation mean FLOPs with every score lowered by MARGIN (the most recomputed scores could spend)."""
    return float(cumulative[steps_run(scores, level + MARGIN) - 1].double().mean())


def threshold_table(scores: Tensor, correct: Tensor, cumulative: list[int], points: int = POINTS) -> list[dict]:
    """The fitted levels (module docstring): entries {target_mean_flops, confidence, mean_flops (validation, at
    the level), bound (margin-proof validation mean: what `choose` compares), accuracy, mean_steps}, by FLOPs."""
    cum = torch.tensor(cumulative, dtype=torch.float64)
    inner = scores[:, :-1].reshape(-1).unique().tolist() if scores.shape[1] > 1 else []
    candidates = sorted({0.0, 1.0, *[s for s in inner if 0 < s < 1]})
    bounds = [None] * len(candidates)

    def bound(i: int) -> float:  # monotone non-decreasing in the level: binary search
        if bounds[i] is None:
            bounds[i] = _bound(scores, cum, candidates[i])
        return bounds[i]

    lo_f, hi_f = float(cum[0]), float(cum[-1])
    table, seen = [], set()
    for t in range(points):
        target = lo_f + (hi_f - lo_f) * t / max(points - 1, 1)
        lo, hi = 0, len(candidates) - 1  # candidates[0] == 0: every input stops after the first step
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if bound(mid) <= target else (lo, mid - 1)
        if lo in seen or bound(lo) > target:
            continue
        seen.add(lo)
        mean, acc, steps = simulate(scores, correct, cum, candidates[lo])
        table.append({"target_mean_flops": round(target, 3), "confidence": candidates[lo],
                      "mean_flops": round(mean, 3), "bound": math.ceil(bound(lo) * 1000) / 1000,
                      "accuracy": acc, "mean_steps": round(steps, 4)})
    return table


def choose(table: list[dict], mean_flops: float) -> dict | None:
    """The entry for a `{"mean_flops": F}` request: the one that spends the most within F (largest bound <= F,
    then the better validation accuracy); None when even stopping every input after the first step does not fit."""
    fits = [e for e in table if e["bound"] <= mean_flops]
    return max(fits, key=lambda e: (e["bound"], e["accuracy"])) if fits else None

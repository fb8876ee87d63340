"""Fitting the combiner (`anytime.combine.Combiner`) on validation data: issue 15, items 4 and 5.

The rules (all on the validation split the training pipeline holds out; documented in the README):

1. **Per-exit temperature.** Each exit's `T[m][k]` minimises that exit's validation NLL alone (temperature
   scaling, Guo et al. 2017) against labels smoothed by `1 / (N + 2)` (Laplace's rule of succession: a small
   validation split without mistakes must not make probabilities arbitrarily sharp; negligible for large N).
   A weak early exit gets softer, so it drags the ensemble less when it joins confident members.
2. **Per-prefix mix, never worse than the prefix before.** Prefix i's weights are
   `lambda * B_i + (1 - lambda) * W_{i-1}` (`B_i`: uniform on the started members' latest tempered exits,
   `W_{i-1}`: the previous prefix's weights, padded with 0 for the new step), lambda the largest value of a grid
   in [0, 1] whose validation accuracy is not below prefix i-1's. lambda = 0 (prefix i-1's prediction) always
   qualifies, so validation accuracy never decreases along the schedule and the full schedule ends at least as
   accurate as its best prefix (exactly, on validation); where the tempered mean does not lose, it is used as is.
3. **Calibration.** Prefix i's mix is temperature-scaled with the `tau_i` of rule 1's objective (changes no
   argmax, so rule 2's accuracies hold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from ensemble.metrics import accuracy

from .combine import TINY, Combiner, Step, latest_weights

LAMBDAS = tuple(i / 20 for i in range(21))
T_RANGE = (0.05, 20.0)  # temperatures searched (golden section on log T)


def smoothed_nll(log_probs: Tensor, labels: Tensor) -> float:
    """Cross-entropy against labels smoothed by eps = 1 / (N + 2) (spread over the other classes)."""
    n, c = log_probs.shape
    eps = 1.0 / (n + 2)
    true = log_probs.gather(-1, labels[:, None]).squeeze(1)
    rest = log_probs.sum(-1) - true
    return float(-((1 - eps) * true + eps / max(c - 1, 1) * rest).mean())


def fit_temperature(log_probs: Tensor, labels: Tensor, iters: int = 40) -> float:
    """The T minimising `smoothed_nll` of `softmax(log_probs / T)` (`(N, C)` logits or log-probabilities), by
    golden-section search on log T over `T_RANGE`; 1.0 unless it is better than T = 1. Rounded to 6 digits."""
    z = log_probs.double().clamp_min(-1e4)

    def loss(log_t: float) -> float:
        return smoothed_nll((z / math.exp(log_t)).log_softmax(-1), labels)

    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    t = round(math.exp((lo + hi) / 2), 6)
    return t if loss(math.log(t)) < loss(0.0) else 1.0


def fit_exit_temperatures(exit_log_probs: Sequence[Tensor], labels: Tensor) -> list[list[float]]:
    """`T[m][k]` for every exit; exit_log_probs[m]: `(N, E_m, C)` validation log-probabilities."""
    return [[fit_temperature(lp[:, k], labels) for k in range(lp.shape[1])] for lp in exit_log_probs]


def fit_mix(steps: Sequence[Step], temps: list[list[float]], tempered: Sequence[Tensor],
            labels: Tensor) -> tuple[list[list[float]], list[float]]:
    """Per-prefix weights (rule 2) and the lambda chosen per prefix (1.0 for the first step). Accuracies are
    those of `Combiner.mix` in float32, as the predictor computes them."""
    weights, lambdas = [[1.0]], [1.0]
    prev_acc = accuracy(tempered[0], labels)
    for i in range(1, len(steps)):
        fresh = latest_weights(steps, i)
        for lam in reversed(LAMBDAS):  # the largest that does not lose (0 never does)
            row = [lam * f + (1 - lam) * o for f, o in zip(fresh, [*weights[-1], 0.0])]
            row = [w / sum(row) for w in row]
            trial = Combiner(steps[: i + 1], temps, [*weights, row], [1.0] * (i + 1))
            acc = accuracy(trial.mix(i, tempered), labels)
            if acc >= prev_acc or lam == 0:
                break
        weights.append(row)
        lambdas.append(lam)
        prev_acc = max(acc, prev_acc)
    return weights, lambdas


def fit_combiner(steps: Sequence[Step], exit_log_probs: Sequence[Tensor], labels: Tensor) -> tuple[Combiner, list[float]]:
    """The fitted `Combiner` along `steps` (rules 1-3) and the lambda of every prefix."""
    temps = fit_exit_temperatures(exit_log_probs, labels)
    comb = Combiner(steps, temps, [[1.0] * (i + 1) for i in range(len(steps))], [1.0] * len(steps))
    tempered = [comb.temper(j, exit_log_probs[m][:, k]) for j, (m, k) in enumerate(steps)]
    weights, lambdas = fit_mix(steps, temps, tempered, labels)
    mixed = Combiner(steps, temps, weights, [1.0] * len(steps))
    taus = [fit_temperature(mixed.mix(i, tempered).clamp_min(TINY).log(), labels) for i in range(len(steps))]
    return Combiner(steps, temps, weights, taus), lambdas

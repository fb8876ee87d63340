"""Classification metrics on probabilities. Shapes: member probabilities `(N, M, C)`, labels `(N,)`."""

from __future__ import annotations

import torch
from torch import Tensor


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """probs (N, C) -> fraction correct."""
    return float((probs.argmax(-1) == labels).double().mean())


def nll(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class, on probabilities (never on logits' softmax twice)."""
    return float(-probs.gather(-1, labels[:, None]).clamp_min(eps).log().double().mean())


def ece(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Expected calibration error with `bins` equal-width confidence bins (Guo et al. 2017)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    total = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.double().mean() * (conf[inside].double().mean() - correct[inside].mean()).abs()
    return float(total)


def disagreement(member_probs: Tensor) -> float:
    """Mean over pairs of members of the fraction of inputs where their predicted classes differ."""
    preds = member_probs.argmax(-1)  # (N, M)
    m = preds.shape[1]
    if m < 2:
        return 0.0
    pairs = [(preds[:, i] != preds[:, j]).double().mean() for i in range(m) for j in range(i + 1, m)]
    return float(torch.stack(pairs).mean())


def combine(member_probs: Tensor) -> Tensor:
    """THE combiner (DESIGN.md step 10): probabilities `(N, M, C)` of M members, each at its latest exit ->
    ensemble probabilities `(N, C)`, their mean. Here for the training metrics (`ensemble` may not import
    `anytime`); `anytime.combine` re-exports it for the predictor, the schedules and the evaluator."""
    return member_probs.mean(1)


def ensemble_report(member_probs: Tensor, labels: Tensor, names: list[str]) -> dict:
    """The metrics.json shape: {"ensemble": {...}, "members": {name: {...}}} (keys stable)."""
    mean = combine(member_probs)
    return {
        "ensemble": {
            "accuracy": accuracy(mean, labels),
            "nll": nll(mean, labels),
            "ece": ece(mean, labels),
            "disagreement": disagreement(member_probs),
        },
        "members": {
            n: {"accuracy": accuracy(member_probs[:, i], labels), "nll": nll(member_probs[:, i], labels)}
            for i, n in enumerate(names)
        },
    }

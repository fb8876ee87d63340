"""The combiner (DESIGN.md step 10): the ensemble's prediction after a schedule prefix is the mean of the
softmax of each started member's latest exit.

`combine` is the one function (it lives in `ensemble.metrics`, whose training metrics use it and which may
not import `anytime`); `LatestExits` keeps the latest exit of every started member as a schedule runs and
combines them. The predictor, the schedules and the evaluator all go through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ensemble.metrics import combine

__all__ = ["LatestExits", "combine"]


class LatestExits:
    """Probabilities `(N, C)` of each started member's latest exit, in the order members started."""

    def __init__(self, latest: dict[int, Tensor] | None = None):
        self.latest: dict[int, Tensor] = dict(latest or {})

    def __len__(self) -> int:
        return len(self.latest)

    def update(self, member: int, probs: Tensor) -> None:
        self.latest[member] = probs

    def with_exit(self, member: int, probs: Tensor) -> LatestExits:
        """A copy with `member` at `probs` (a step tried, not taken)."""
        trial = LatestExits(self.latest)
        trial.update(member, probs)
        return trial

    def stacked(self) -> Tensor:
        """`(N, M_started, C)`: the started members' latest exits."""
        return torch.stack(list(self.latest.values()), 1)

    def probs(self) -> Tensor:
        """`(N, C)`: the ensemble's probabilities, `combine` of the latest exits."""
        return combine(self.stacked())

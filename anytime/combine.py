"""The combiners (DESIGN.md step 10): the ensemble's prediction after a schedule prefix.

* `combine` (plain, `ensemble.metrics.combine`: the training metrics use it and `ensemble` may not import
  `anytime`) is the mean of the softmax of each started member's latest exit; `LatestExits` keeps those as a
  schedule runs. The schedules and the evaluator's "plain" (before fitting) curve go through it.
* `Combiner` is what a checkpoint's anytime record stores (`anytime.fit` fits it on validation data, issue 15
  items 4 and 5) and what the predictor, the per-input early exit and the evaluator apply:
  1. every exit (m, k) is tempered: `q = softmax(logits / T[m][k])` (`exit_temperatures`);
  2. prefix i (steps 0..i) mixes the tempered exits of the steps run so far: `p_i = sum_j weights[i][j] q_j`
     (non-negative weights summing to 1; an exit a member has moved past may keep a weight);
  3. the mix is calibrated: `softmax(log p_i / tau_i)` (`prefix_temperatures`: temperature scaling, which changes
     no argmax).
  `Combiner.plain(...)` (every temperature 1, uniform weights on the latest exits) computes exactly what
  `combine` does (same operations): it is the combiner of records without fitted parts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.metrics import combine

__all__ = ["Combiner", "LatestExits", "combine", "latest_weights", "temper"]

TINY = 1e-30  # log(0) guard: mixed probabilities can underflow in float32
Step = tuple[int, int]  # as `anytime.costs.Step` (this module may not import costs: one layer)


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


def temper(logits: Tensor, temperature: float) -> Tensor:
    """`softmax(logits / temperature)` (logits or log-probabilities alike); temperature 1 is plain softmax."""
    return (logits if temperature == 1.0 else logits / temperature).softmax(-1)


def latest_weights(steps: Sequence[Step], i: int) -> list[float]:
    """Weights over steps 0..i of the plain combiner: uniform on each started member's latest exit."""
    latest = {m: j for j, (m, _) in enumerate(steps[: i + 1])}
    return [1.0 / len(latest) if latest.get(m) == j else 0.0 for j, (m, _) in enumerate(steps[: i + 1])]


class Combiner:
    """Per-exit temperatures, per-prefix mixing weights and per-prefix calibration (module docstring)."""

    def __init__(self, steps: Sequence[Step], exit_temperatures: list[list[float]], weights: list[list[float]],
                 prefix_temperatures: list[float]):
        self.steps = [tuple(s) for s in steps]
        self.exit_temperatures = [[float(t) for t in row] for row in exit_temperatures]
        self.weights = [[float(w) for w in row] for row in weights]
        self.prefix_temperatures = [float(t) for t in prefix_temperatures]
        # per prefix, the (step, weight) pairs that count, and whether they are uniform (then: `combine`'s mean)
        self._terms = [[(j, w) for j, w in enumerate(row) if w != 0.0] for row in self.weights]
        self._uniform = [len({w for _, w in terms}) == 1 and abs(terms[0][1] * len(terms) - 1) < 1e-9
                         for terms in self._terms]

    @classmethod
    def plain(cls, steps: Sequence[Step], num_exits: Sequence[int]) -> Combiner:
        n = len(steps)
        return cls(steps, [[1.0] * e for e in num_exits], [latest_weights(steps, i) for i in range(n)], [1.0] * n)

    @classmethod
    def from_record(cls, record: dict, steps: Sequence[Step]) -> Combiner:
        """The record's combiner (`combiner` and `calibration` keys); a record without them: `plain`."""
        c = record.get("combiner")
        if c is None:
            return cls.plain(steps, record["num_exits"])
        cal = record.get("calibration") or {"prefix_temperatures": [1.0] * len(steps)}
        return cls(steps, c["exit_temperatures"], c["weights"], cal["prefix_temperatures"])

    def to_record(self) -> dict:
        """The `combiner` and `calibration` entries of anytime.json."""
        return {"combiner": {"kind": "tempered-mix", "exit_temperatures": self.exit_temperatures,
                             "weights": self.weights},
                "calibration": {"kind": "temperature", "prefix_temperatures": self.prefix_temperatures}}

    def uncalibrated(self) -> Combiner:
        """This combiner without step 3 (every prefix temperature 1): the evaluator's "before calibration"."""
        return Combiner(self.steps, self.exit_temperatures, self.weights, [1.0] * len(self.steps))

    def check(self, num_exits: Sequence[int], where: str) -> None:
        """One-line error unless the shapes fit the schedule and every number is valid."""
        n = len(self.steps)
        ok = ([len(r) for r in self.exit_temperatures] == list(num_exits) and len(self.weights) == n
              and len(self.prefix_temperatures) == n and all(len(r) == i + 1 for i, r in enumerate(self.weights)))
        if not ok:
            raise SuperweightsError(f"{where}: the combiner does not fit the schedule ({n} steps, exits {list(num_exits)})")
        temps = [t for r in self.exit_temperatures for t in r] + self.prefix_temperatures
        if not all(math.isfinite(t) and t > 0 for t in temps):
            raise SuperweightsError(f"{where}: combiner temperatures must be finite and > 0")
        for i, row in enumerate(self.weights):
            if not (all(math.isfinite(w) and w >= 0 for w in row) and abs(sum(row) - 1) < 1e-6):
                raise SuperweightsError(f"{where}: combiner weights of prefix {i + 1} must be >= 0 and sum to 1")

    def temper(self, j: int, logits: Tensor) -> Tensor:
        """Step j's exit, tempered: `(N, C)` probabilities from its logits (or log-probabilities)."""
        m, k = self.steps[j]
        return temper(logits.float(), self.exit_temperatures[m][k])

    def mix(self, i: int, tempered: Mapping[int, Tensor] | Sequence[Tensor]) -> Tensor:
        """Prefix i's uncalibrated probabilities from `tempered[j]` (step j's tempered exit, `(N, C)`)."""
        terms = self._terms[i]
        if self._uniform[i]:
            return combine(torch.stack([tempered[j] for j, _ in terms], 1))
        out = tempered[terms[0][0]] * terms[0][1]
        for j, w in terms[1:]:
            out = out + tempered[j] * w
        return out

    def calibrate(self, i: int, probs: Tensor) -> Tensor:
        t = self.prefix_temperatures[i]
        return probs if t == 1.0 else temper(probs.clamp_min(TINY).log(), t)

    def probs(self, i: int, tempered: Mapping[int, Tensor] | Sequence[Tensor]) -> Tensor:
        """Prefix i's calibrated ensemble probabilities `(N, C)`."""
        return self.calibrate(i, self.mix(i, tempered))

    def needed_after(self) -> list[int]:
        """Per step j, the last prefix whose mix uses step j's exit (-1: none): kept only that long."""
        last = [-1] * len(self.steps)
        for i, terms in enumerate(self._terms):
            for j, _ in terms:
                last[j] = i
        return last

    def prefix_probs(self, exit_logits: Sequence[Tensor]) -> list[Tensor]:
        """Calibrated probabilities `(N, C)` after every prefix, from every exit's logits or log-probabilities
        (`exit_logits[m]`: `(N, E_m, C)`), computed as the predictor computes them."""
        tempered = [self.temper(j, exit_logits[m][:, k]) for j, (m, k) in enumerate(self.steps)]
        return [self.probs(i, tempered) for i in range(len(self.steps))]

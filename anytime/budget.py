"""What an anytime prediction may spend: one typed value, parsed once and carried to the predictor.

A budget is a frozen dataclass (hashable: the micro-batcher groups requests whose budgets are equal):

* `Budget()` (`UNLIMITED`): the whole schedule;
* `FlopsBudget(flops)`: the longest schedule prefix within `flops` per-image FLOPs (never exceeded);
* `DeadlineBudget(ms, flops=None)`: a step starts only if its measured time fits in `ms` milliseconds (the first
  step always runs), optionally also capped at `flops` per-image FLOPs;
* `MeanFlopsBudget(mean_flops)`: per-input early exit at the confidence level fitted (on the validation split)
  for at most `mean_flops` FLOPs per image on average (`anytime.early_exit`);
* `ConfidenceBudget(confidence)`: per-input early exit at that level (an input stops after the first step whose
  confidence is above it; 1 = the full schedule, 0 = the first step only).

The predictor reads `max_flops`, `deadline_ms`, `mean_flops_target` and `exit_confidence`; `after(ms)` is the
budget left once `ms` have passed (the server subtracts queueing time and its response margin). A new kind is a
subclass with its own fields and properties, registered in `KINDS` under the key a request names it by
(`{"flops": F}`, `{"ms": T}`, `{"mean_flops": F}`, `{"confidence": c}`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from core.errors import SuperweightsError


@dataclass(frozen=True)
class Budget:
    """No limit: every step of the schedule runs."""

    key: ClassVar[str | None] = None  # the request's name for this kind ({"<key>": value})
    unit: ClassVar[str] = ""  # what the value counts, for messages

    @property
    def max_flops(self) -> float | None:
        """Per-image FLOPs the steps may add up to (None: no FLOPs limit)."""
        return None

    @property
    def deadline_ms(self) -> float | None:
        """Milliseconds from the start of the run by which it should be done (None: no deadline)."""
        return None

    @property
    def mean_flops_target(self) -> float | None:
        """Mean per-image FLOPs the early-exit level is chosen for (None: no early exit by mean FLOPs)."""
        return None

    @property
    def exit_confidence(self) -> float | None:
        """The confidence level above which an input stops early (None: no per-input early exit)."""
        return None

    def after(self, elapsed_ms: float) -> Budget:
        """What is left of this budget once `elapsed_ms` have passed (only deadlines shrink)."""
        return self

    @classmethod
    def requested(cls, value: float) -> Budget:
        """The budget a request asks for with `{cls.key: value}`; one-line error unless value is finite and > 0."""
        if not (math.isfinite(value) and value > 0):
            raise SuperweightsError(f"budget.{cls.key} must be > 0 {cls.unit}, got {value:g}")
        return cls(value)


UNLIMITED = Budget()


@dataclass(frozen=True)
class FlopsBudget(Budget):
    """At most `flops` FLOPs per image (the longest schedule prefix whose cumulative FLOPs fit)."""

    key: ClassVar[str] = "flops"
    unit: ClassVar[str] = "FLOPs per image"
    flops: float

    @property
    def max_flops(self) -> float:
        return self.flops


@dataclass(frozen=True)
class DeadlineBudget(Budget):
    """Done within `ms` milliseconds (a step starts only if its measured time fits), and, if `flops` is given,
    within that many FLOPs per image as well."""

    key: ClassVar[str] = "ms"
    unit: ClassVar[str] = "milliseconds"
    ms: float
    flops: float | None = None

    @property
    def max_flops(self) -> float | None:
        return self.flops

    @property
    def deadline_ms(self) -> float:
        return self.ms

    def after(self, elapsed_ms: float) -> DeadlineBudget:
        return dataclasses.replace(self, ms=self.ms - elapsed_ms)


@dataclass(frozen=True)
class MeanFlopsBudget(Budget):
    """Per-input early exit whose level keeps the validation mean at or below `mean_flops` FLOPs per image."""

    key: ClassVar[str] = "mean_flops"
    unit: ClassVar[str] = "FLOPs per image on average"
    mean_flops: float

    @property
    def mean_flops_target(self) -> float:
        return self.mean_flops


@dataclass(frozen=True)
class ConfidenceBudget(Budget):
    """Per-input early exit: an input stops after the first step whose confidence is above `confidence`."""

    key: ClassVar[str] = "confidence"
    unit: ClassVar[str] = "(a probability)"
    confidence: float

    @property
    def exit_confidence(self) -> float:
        return self.confidence

    @classmethod
    def requested(cls, value: float) -> Budget:
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise SuperweightsError(f"budget.confidence must be a number in [0, 1] (1: the whole schedule, 0: the "
                                    f"first step only), got {value:g}")
        return cls(value)


KINDS: dict[str, type[Budget]] = {kind.key: kind for kind in (FlopsBudget, DeadlineBudget, MeanFlopsBudget,
                                                              ConfidenceBudget)}


def budget_of(flops: float | None = None, ms: float | None = None) -> Budget:
    """The budget of the predictor's keyword form `predict(x, budget_flops=..., deadline_ms=...)`."""
    if ms is not None:
        return DeadlineBudget(ms, flops)
    return UNLIMITED if flops is None else FlopsBudget(flops)

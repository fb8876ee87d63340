"""How the training loop talks to the other workers of a run: `Collective` is the one-process case.

The loop (`ensemble.loop`) and the method's learning steps (`ensemble.grouping`) are written once, against
this small interface; `ray_jobs.parallel.WorkerCollective` implements it over `torch.distributed` for
member-parallel x data-parallel layouts. In one process every call is the identity:

* `members`: the member ids this worker computes (None = all);
* `view`: what `train_step` and the gradient measurements call instead of the model (a worker weighs its
  slice's outputs so replicas' gradients add up to the full batch's); `attach(model)` sets it and must be
  called again whenever the model or its parameters change (regrouping, unsharing);
* `begin(step, y)` before each forward on batch `step` of an epoch (`y`: this worker's slice);
* `after_backward`: `train_step`'s hook between backward and the optimizer step (gradient all-reduce);
* `step_finite(loss)`: False when the step diverged (the same answer on every worker);
* `step_stats(loss, logits, y)`: (loss x examples, correct, examples) of a step for the epoch's train
  metrics, over the global batch once the epoch's `sum_float` has run;
* `sum_(t)`: sum a tensor over workers in place (gradients measured per member group / replica);
  `sum_float`, `broadcast_ints` (rank 0's list of ints), `sync_buffers(model)` (BN statistics to every rank).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .metrics import combine


class Collective:
    rank = 0
    world = 1
    members: list[int] | None = None
    after_backward = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def attach(self, model: nn.Module) -> None:
        self.view = model

    def shard(self, loader):
        return loader

    def begin(self, step: int, y: Tensor) -> None:
        pass

    def step_stats(self, loss: Tensor, logits: Tensor, y: Tensor) -> tuple[float, int, int]:
        correct = int((combine(logits.softmax(-1)).argmax(-1) == y).sum())
        return float(loss) * len(y), correct, len(y)

    def step_finite(self, loss: Tensor) -> bool:
        """Whether the step's loss is finite; every worker must give the same answer (they stop together)."""
        return math.isfinite(float(loss))

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def sum_float(self, value: float) -> float:
        return value

    def broadcast_ints(self, values: list[int] | None) -> list[int]:
        return list(values)

    def sync_buffers(self, model: nn.Module) -> None:
        pass

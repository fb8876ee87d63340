"""Member x data parallelism on top of `torch.distributed` (gloo on CPU, nccl on GPU).

Ranks are laid out group-major: `rank = member_group * data_replicas + replica`. Every worker holds the
whole model (bank, coefficients, every member); a worker runs only its member group's members on its
replica's contiguous slice of each global batch, so after backward:

* gradients of different member groups are *summed* (the ensemble loss is a sum over members);
* gradients of data replicas are *averaged*, exactly: each replica's loss gradient is scaled by
  `slice / batch` before backward (`_GradScale` on the model's outputs), so the sum over replicas is the gradient of
  the single-process loss of the full batch even for a short (or empty) last slice;
* all of it travels in ONE flat all-reduce per step (`StepSync`), together with "this parameter got a
  gradient" flags (so an unused parameter keeps `grad=None` exactly as in single-process training), the
  batch's labels and the members' summed probabilities (train accuracy without a second collective); the
  train loss is summed once per epoch (`sum_over_workers`).

Batch-norm statistics are per batch in single-process training, so replicas of one member group share
them through `SyncBatchNorm1d/2d/3d` (one differentiable all-reduce per BN layer in forward and in backward,
CPU-capable, unlike `torch.nn.SyncBatchNorm`). A member's running statistics live with its member group
and are gathered (`gather_member_buffers`, one collective) before evaluation and checkpoints.

The pieces: `parallel_batchnorm` (the synchronised batch norm), `parallel_step` (`StepSync` and the other
collectives); here, `WorkerCollective`, what the training loop talks to on a worker.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ensemble.collective import Collective

from .layout import Layout, available_cpus, partition_members, resolve_layout  # noqa: F401  (moved; re-exported)
from .parallel_step import StepSync, gather_member_buffers, make_replica_group, sum_over_workers


class WorkerCollective(Collective):
    """`ensemble.collective.Collective` for one Ray Train worker of a `member_groups x data_replicas` layout.

    `attach` wraps the (re)built model in a `StepSync` (parameters are re-read: regrouping and unsharing
    replace them); `begin(step, y)` tells it the slice of global batch `step` this worker holds."""

    def __init__(self, layout: Layout, rank: int, num_classes: int, num_examples: int, batch_size: int,
                 device: torch.device):
        self.layout, self.rank, self.world = layout, rank, layout.world
        self.device = device  # collectives' tensors live here (nccl needs CUDA tensors)
        self.members = layout.members_of(rank)
        self.num_classes, self.num_examples, self.batch_size = num_classes, num_examples, batch_size
        self.replica, self.replicas = layout.replica_of(rank), layout.data_replicas
        self.replica_group = make_replica_group(layout, rank) if self.replicas > 1 else None
        self.sync: StepSync | None = None

    def attach(self, model: nn.Module) -> None:
        self.sync = StepSync(model, self.layout, self.rank, self.num_classes, self.replica_group)
        self.view = self.sync.model
        self.after_backward = self.sync

    def shard(self, loader):
        return loader.shard(self.replica, self.replicas) if self.replicas > 1 else loader

    def begin(self, step: int, y: Tensor) -> None:
        batch, start, length = slice_of(step, self.num_examples, self.batch_size, self.replica, self.replicas)
        if length != len(y):
            raise RuntimeError(f"batch {step}: expected a slice of {length} examples, got {len(y)}")
        self.sync.begin(y, batch, start)

    def step_stats(self, loss: Tensor, logits: Tensor, y: Tensor) -> tuple[float, int, int]:
        # The slice's loss: mean over the slice of its members' losses (NaN when the slice is empty).
        return (float(loss) * len(y) if len(y) else 0.0), self.sync.correct, self.sync._batch

    def step_finite(self, loss: Tensor) -> bool:
        return self.sync.finite

    def sum_(self, t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t

    def sum_float(self, value: float) -> float:
        return sum_over_workers(value, self.device)

    def broadcast_ints(self, values: list[int] | None) -> list[int]:
        # Two small broadcasts (length, values) instead of broadcast_object_list, which pickles.
        dev = self.device
        n = torch.tensor([len(values) if self.is_main else 0], dtype=torch.int64, device=dev)
        dist.broadcast(n, src=0)
        data = torch.tensor(values if self.is_main else [0] * int(n), dtype=torch.int64, device=dev)
        dist.broadcast(data, src=0)
        return [int(v) for v in data.tolist()]

    def sync_buffers(self, model: nn.Module) -> None:
        gather_member_buffers(model, self.layout, self.rank)


def slice_of(step: int, n: int, batch_size: int, replica: int, replicas: int) -> tuple[int, int, int]:
    """(global batch size, slice start within the batch, slice length): `Loader.shard`'s split."""
    b = min(batch_size, n - step * batch_size)
    q, r = divmod(b, replicas)
    start = replica * q + min(replica, r)
    return b, start, q + (1 if replica < r else 0)

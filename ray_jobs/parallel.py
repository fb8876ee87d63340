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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ensemble.collective import Collective

from .layout import Layout, available_cpus, partition_members, resolve_layout  # noqa: F401  (moved; re-exported)

# ---------------------------------------------------------------------------------------------- batch norm


class _SyncStats:
    """Batch norm whose training-mode statistics are those of the union of the group's slices.

    Statistics are reduced in float64 (per-channel sum, sum of squares, count) by one differentiable
    all-reduce, so forward and gradient equal single-process batch norm on the concatenated batch. A replica
    with an empty slice still takes part (it contributes zeros). Eval mode is the plain layer.
    Built by `convert_sync_batchnorm`: the subclasses below keep `isinstance(m, nn.BatchNorm2d)` etc. true.
    """

    process_group = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        xd = x.transpose(0, 1).reshape(c, -1).double()
        local = torch.cat([xd.sum(1), (xd * xd).sum(1), xd.new_full((1,), float(xd.shape[1]))])
        total = _AllReduceSum.apply(local, self.process_group)
        n = total[-1]
        count = int(n.item())
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_((var * count / (count - 1)).to(self.running_var.dtype), alpha=m)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * (var + self.eps).rsqrt().to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class SyncBatchNorm1d(_SyncStats, nn.BatchNorm1d):
    pass


class SyncBatchNorm2d(_SyncStats, nn.BatchNorm2d):
    pass


class SyncBatchNorm3d(_SyncStats, nn.BatchNorm3d):
    pass


_SYNC = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}


def convert_sync_batchnorm(module: nn.Module, group) -> nn.Module:
    """Make every BatchNorm1d/2d/3d under `module` synchronise over `group`, in place. Parameters and buffers
    are shared, not copied, so state_dict keys, parameter order and optimizer references stay the same."""
    for name, child in module.named_children():
        sync_type = _SYNC.get(type(child))
        if sync_type is not None:
            sync = sync_type.__new__(sync_type)
            sync.__dict__ = child.__dict__  # same Parameters, buffers and hyper-parameters
            sync.process_group = group
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, group)
    return module


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over a process group: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def make_replica_group(layout: Layout, rank: int):
    """The process group of this rank's data replicas. `new_group` is collective: every rank creates every
    group, in the same order, so call it on every rank, once per run."""
    mine = None
    for g in range(layout.member_groups):
        pg = dist.new_group(layout.replica_ranks(g)) if layout.member_groups > 1 else dist.group.WORLD
        if g == layout.group_of(rank):
            mine = pg
    return mine


class StepSync:
    """Everything a worker needs around `ensemble.training.train_step`.

    * `begin(y, batch, start)` before a step: this worker's slice of the global batch (labels `y`, offset
      `start`, global size `batch`); sets the slice's loss weight `len(y) / batch`.
    * `model` (a view of the real model) is what the worker passes to `train_step`: its outputs carry that
      weight into backward (identity forward, gradient x weight), so the replicas' gradients add up to the
      single-process gradient of the full batch, batch-norm coupling included.
    * `__call__` is train_step's `after_backward` hook: ONE all-reduce of
      [grads (zeros where None) | got-a-grad flags | labels of the batch | summed member probabilities].
      Afterwards `correct` is the ensemble's train-accuracy hits on the global batch.
    """

    def __init__(self, model: nn.Module, layout: Layout, rank: int, num_classes: int, replica_group=None):
        self.layout, self.rank = layout, rank
        self.members = layout.members_of(rank)
        self.num_members = sum(len(g) for g in layout.groups)
        self.num_classes = num_classes
        self.params = list(model.parameters())
        self.replica_group = replica_group
        if layout.data_replicas > 1:
            if replica_group is None:
                self.replica_group = make_replica_group(layout, rank)
            for i in self.members:
                convert_sync_batchnorm(model.members[i], self.replica_group)
        self.model = _WeightedOutputs(model, self)
        self._scale = 1.0
        self._rows = (0, 0)
        self._batch = 0
        self._y: Tensor | None = None
        self._logits: Tensor | None = None
        self.correct = 0
        self.finite = True

    def begin(self, y: Tensor, batch: int, start: int) -> None:
        self._y, self._batch, self._rows = y, batch, (start, start + len(y))
        self._scale = len(y) / batch
        self._logits = None

    def _weigh(self, out: Tensor) -> Tensor:
        return _GradScale.apply(out, self._scale) if torch.is_grad_enabled() else out

    def __call__(self, model=None) -> None:
        y = self._y
        empty = y is None or len(y) == 0
        dev = self.params[0].device
        n_params, batch, c = len(self.params), self._batch, self.num_classes
        parts = []
        for p in self.params:
            if p.grad is None or empty:  # an empty slice contributes exactly nothing (never NaN)
                parts.append(torch.zeros(p.numel(), device=dev, dtype=torch.float32))
            else:
                parts.append(p.grad.detach().reshape(-1).float())
        flags = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32, device=dev)
        labels = torch.zeros(batch, device=dev)
        probs = torch.zeros(batch, c, device=dev)
        if not empty and self._logits is not None:
            lo, hi = self._rows
            probs[lo:hi] = self._logits.float().softmax(-1).sum(1)
            if self.layout.group_of(self.rank) == 0:  # each label once: member group 0 covers the batch
                labels[lo:hi] = y.to(dev, torch.float32)
        flat = torch.cat(parts + [flags, labels, probs.reshape(-1)])
        dist.all_reduce(flat)
        total = sum(p.numel() for p in self.params)
        got = flat[total:total + n_params].tolist()
        offset = 0
        for p, flag in zip(self.params, got):
            n = p.numel()
            if flag > 0:
                g = flat[offset:offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            else:
                p.grad = None
            offset += n
        tail = flat[total + n_params:]
        labels = tail[:batch].round().long()
        mean_probs = tail[batch:].view(batch, c) / self.num_members
        self.correct = int((mean_probs.argmax(-1) == labels).sum())
        # Every rank sees every rank's outputs here, so all of them agree whether the step diverged (a NaN
        # or infinite logit anywhere makes its softmax NaN) and stop together instead of one hanging.
        self.finite = bool(torch.isfinite(tail).all())


class _WeightedOutputs:
    """The model as `train_step` sees it on a worker: same calls, outputs weighted for backward.

    Attributes it does not define (`has_exits`, `exit_weights`, `members`, ...) are the real model's."""

    def __init__(self, model: nn.Module, sync: StepSync):
        self._model, self._sync = model, sync

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, x: Tensor, members: list[int] | None = None) -> Tensor:
        out = self._model(x, members)  # (B, M', C)
        self._sync._logits = out.detach()
        return self._sync._weigh(out)

    def forward_exits_list(self, x: Tensor, members: list[int] | None = None) -> list[Tensor]:
        outs = self._model.forward_exits_list(x, members)  # per member (B, E_m, C)
        self._sync._logits = torch.stack([o[:, -1] for o in outs], dim=1).detach()
        return [self._sync._weigh(o) for o in outs]


def sum_over_workers(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


@torch.no_grad()
def gather_member_buffers(model: nn.Module, layout: Layout, rank: int) -> None:
    """Every rank gets each member's buffers (BN running statistics) from the member's owner rank.

    One float64 all-reduce where only the owner contributes (exact for float32 and small integers)."""
    entries = []
    for i, member in enumerate(model.members):
        owner = layout.owner_of(i)
        for b in member.buffers():
            entries.append((b, owner))
    if not entries:
        return
    dev = entries[0][0].device
    flat = torch.cat([
        (b.detach().double().reshape(-1) if owner == rank else torch.zeros(b.numel(), dtype=torch.float64, device=dev))
        for b, owner in entries
    ])
    dist.all_reduce(flat)
    offset = 0
    for b, _ in entries:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b).to(b.dtype))
        offset += n


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

"""One training step across workers (`StepSync`): the replicas' gradient weighting (`_GradScale` on the model's
outputs) and the ONE flat all-reduce after backward; plus the other collectives of `ray_jobs.parallel`
(replica groups, `sum_over_workers`, `gather_member_buffers`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layout import Layout
from .parallel_batchnorm import convert_sync_batchnorm


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

"""Batch norm synchronised over a process group (`SyncBatchNorm1d/2d/3d`, `convert_sync_batchnorm`): the data
replicas of one member group compute the statistics of the union of their slices, as single-process batch
norm does on the whole batch. CPU-capable (gloo), unlike `torch.nn.SyncBatchNorm`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


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

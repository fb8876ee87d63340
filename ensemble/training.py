"""The pieces the training loop (`ensemble.loop`) is made of: optimizer, losses, one step, evaluation.

`train_step` takes an `after_backward` hook (where a Ray worker all-reduces gradients) and the member ids
a worker computes; nothing here loops over epochs: `ensemble.loop.run` is the one epoch loop.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import SuperweightsError

from .config import Config
from .data import DatasetInfo, Loader
from .metrics import ensemble_report
from .model import StackedEnsemble
from .planning import has_convs

_DEVICE = re.compile(r"cuda:[0-9]+")


def validate_device(name) -> str:
    """`name` if it is a device superweights runs on (`cpu`, `cuda`, `cuda:N` with N a GPU index >= 0), else
    a one-line error. Syntax only (no CUDA query): the CLI checks it before anything starts, even where the
    GPUs are on other machines (Ray workers); `resolve_device` also checks that the device exists here."""
    if isinstance(name, str) and (name in ("cpu", "cuda") or _DEVICE.fullmatch(name)):
        return name
    raise SuperweightsError(f"--device must be cpu or cuda, got {name!r}: use cpu, cuda or cuda:N "
                            "(N = a GPU index >= 0)")


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for a valid `name` (`validate_device`) that exists on this machine; one-line errors."""
    name = validate_device(str(name) if isinstance(name, torch.device) else name)
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SuperweightsError(f"--device {name} was asked for but torch sees no CUDA device; use --device cpu")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise SuperweightsError(f"--device {name} was asked for but torch sees {count} CUDA device"
                                f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return torch.device(name)


def make_optimizer(model: StackedEnsemble, config: Config, steps_per_epoch: int, epochs: int | None = None):
    """SGD + Nesterov momentum; weight decay on everything except coefficients; per-step cosine LR over
    `epochs` (default train.epochs)."""
    t = config.train
    coef = [p for n, p in model.named_parameters() if n.endswith("bank.coefficients")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("bank.coefficients")]
    groups = [{"params": rest, "weight_decay": t.weight_decay}]
    if coef:
        groups.append({"params": coef, "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    total = max(1, (t.epochs if epochs is None else epochs) * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return opt, sched


def ensemble_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Sum over members of cross-entropy on the same batch. logits (B, M, C)."""
    b, m, c = logits.shape
    return F.cross_entropy(logits.reshape(b * m, c), y.repeat_interleave(m), reduction="sum") / b


def exit_loss(exit_logits: list[Tensor], y: Tensor, weights: tuple[float, ...] | list[float] = ()) -> Tensor:
    """Sum over members and exits of weighted cross-entropy (DESIGN.md step 9). exit_logits: per member
    (B, E_m, C); `weights`: one per exit (every member must then have that many exits), empty = all 1."""
    total = exit_logits[0].new_zeros(())
    for logits in exit_logits:
        b, e, c = logits.shape
        if weights and len(weights) != e:
            raise SuperweightsError(f"ensemble.exit_weights has {len(weights)} weights but a member has {e} exits")
        ce = F.cross_entropy(logits.reshape(b * e, c), y.repeat_interleave(e), reduction="none").view(b, e)
        w = ce.new_tensor(weights) if weights else ce.new_ones(e)
        total = total + (ce * w).sum() / b
    return total


def model_loss(model, x: Tensor, y: Tensor, members: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """(training loss, last-exit logits (B, M', C)) of `members` (default all) on one batch.

    With exits (`model.has_exits`) the loss sums every exit weighted by `model.exit_weights` (DESIGN.md
    step 9), else every member's last. `model`: a `StackedEnsemble` or a view of one (`Collective.view`)."""
    if model.has_exits:
        outs = model.forward_exits_list(x, members)
        loss = exit_loss(outs, y, model.exit_weights)
        return loss, torch.stack([o[:, -1] for o in outs], dim=1)
    logits = model(x, members)
    return ensemble_loss(logits, y), logits


def autocast_loss(model, x: Tensor, y: Tensor, members: list[int] | None, precision: str) -> tuple[Tensor, Tensor]:
    """`model_loss` with the members' forward under bf16 autocast (`precision` "bf16") and everything else in
    fp32: a bank's weights are generated first, outside the autocast region (so the template mixing and its
    gradients stay fp32; autocast casts them to bf16 per conv/linear call), then bound for the forward
    (`using_weights`). The loss (cross-entropy is an fp32 op under autocast) and logits come back in fp32."""
    if precision == "fp32":
        return model_loss(model, x, y, members)
    generate = getattr(model, "_weights", None)  # bank ensembles (SuperWeights, SSN); a `Collective.view` forwards it
    bound = model.using_weights(generate(members)) if generate is not None else nullcontext()
    with bound, torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        loss, logits = model_loss(model, x, y, members)
    return loss.float(), logits.float()


# torch.compile's backend for `train.compile`; tests swap in "eager" (Dynamo's tracing without code generation,
# seconds instead of minutes on a CPU) or a failing one (the fallback).
COMPILE_BACKEND = "inductor"


def resolve_channels_last(config: Config, info: DatasetInfo | None = None) -> bool:
    """`train.channels_last`; unset = on, on every device (`TrainConfig.channels_last`: until 2026-12-08 it was on
    CUDA only, on the belief that NHWC pays off only there; measured on this CPU it does too, and a model made
    fresh on a CPU and on a GPU from one config is now the same model). With `info`: False for members without
    convolutions (an MLP ensemble), which no memory format changes, so nothing says or saves channels_last."""
    t = config.train.channels_last
    on = True if t is None else t
    return on and (info is None or has_convs(config, info))


class Accelerator:
    """What `train.precision`, `train.channels_last` and `train.compile` do to the loop, on any device.

    * `prepare(model)`: conv members (their parameters and buffers) to channels_last;
    * `inputs(x)`: a batch to the device, channels_last when the members are;
    * `step(...)`: `train_step` in the configured precision, with the members' forward compiled
      (`torch.compile` of each member, `nn.Module.compile`'s mechanism) during the step only: evaluation,
      gradient measurements, checkpoints and `materialize` (which deep-copies members) always see the plain
      members. Where compiling fails (no compiler, an unsupported op, an old Python), ONE warning line goes
      to stderr and the step is rerun eagerly, as is every later step (the failed try may have updated the
      batch norm statistics of that first batch once more).
    """

    def __init__(self, config: Config, device: torch.device, info: DatasetInfo | None = None):
        """`info`: the dataset the members are built for (then members without convs train row-major)."""
        t = config.train
        self.device = torch.device(device)
        self.precision = t.precision
        self.channels_last = resolve_channels_last(config, info)
        self.compile = t.compile
        self.failed = False  # compiling failed once: eager from then on
        self._compiled: dict[int, Callable] = {}
        self._conv = False  # the members have convs (set by `prepare`)
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SuperweightsError(f"train.precision = \"bf16\" needs a GPU with bf16 support; {self.device} has "
                                    "none: use train.precision = \"fp32\"")

    def prepare(self, model: StackedEnsemble) -> StackedEnsemble:
        """The model, its conv members in channels_last if asked (only members: a bank's tensors keep their
        layout, and members without convs have nothing to gain)."""
        self._compiled.clear()
        self._conv = any(isinstance(m, nn.Conv2d) for m in model.members.modules())
        if self.channels_last and self._conv:
            for member in model.members:
                member.to(memory_format=torch.channels_last)
        return model

    def inputs(self, x: Tensor) -> Tensor:
        if self.channels_last and self._conv and x.dim() == 4:
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    def _members(self, model) -> list[nn.Module]:
        return list(getattr(model, "members", ()))

    def _compile_on(self, model) -> bool:
        if not self.compile or self.failed:
            return False
        try:
            members = self._members(model)
            # Dynamo compiles one graph per distinct member architecture (its guards are the shapes and modules;
            # same-shaped members share one), all under the one code object of the members' class, which holds
            # 8 graphs by default: past that the other members of a 9+-architecture ensemble ran eagerly, said
            # only by a torch log line. (Train and eval modes may differ: twice the members.)
            import torch._dynamo  # (imported by torch.compile anyway; only when compiling)

            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * len(members))
            for m in members:
                if id(m) not in self._compiled:
                    self._compiled[id(m)] = torch.compile(m._call_impl, backend=COMPILE_BACKEND)
                m._compiled_call_impl = self._compiled[id(m)]
        except Exception as e:  # torch.compile itself refused (e.g. an unsupported Python)
            self._fall_back(model, e)
            return False
        return True

    def _compile_off(self, model) -> None:
        for m in self._members(model):
            m._compiled_call_impl = None

    def _fall_back(self, model, error: BaseException) -> None:
        self._compile_off(model)
        self.failed = True
        self._compiled.clear()
        first = (str(error).strip().splitlines() or [""])[0][:200]
        print(f"superweights: warning: train.compile: torch.compile failed here ({type(error).__name__}: {first}); "
              "training continues without it", file=sys.stderr, flush=True)

    def step(self, model, x, y, optimizer, scheduler, after_backward=None, members=None):
        """`train_step` of `model` (the model or its `Collective.view`) with this configuration."""
        args = (model, x, y, optimizer, scheduler, after_backward, members, self.precision)
        if not self._compile_on(model):
            return train_step(*args)
        try:
            return train_step(*args)
        except Exception as e:  # (re)compiling failed; a real error fails again eagerly and propagates
            self._fall_back(model, e)
        finally:
            self._compile_off(model)
        return train_step(*args)


def train_step(model, x, y, optimizer, scheduler, after_backward: Callable[[nn.Module], None] | None = None,
               members: list[int] | None = None, precision: str = "fp32"):
    """One optimisation step. `members`: compute the loss of these members only (member-parallel workers);
    `after_backward(model)`: runs between backward and the optimizer step (gradient all-reduce); `precision`:
    `train.precision` (`autocast_loss`)."""
    loss, logits = autocast_loss(model, x, y, members, precision)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward(model)
    optimizer.step()
    scheduler.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def predict_probs(model, loader: Loader, device) -> tuple[Tensor, Tensor]:
    """Member probabilities (N, M, C) and labels (N,), in loader order."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(model(x.to(device)).float().softmax(-1).cpu())
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def evaluate(model, loader: Loader, device) -> dict:
    probs, labels = predict_probs(model, loader, device)
    return ensemble_report(probs, labels, list(model.names))

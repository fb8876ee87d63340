"""Single-process training: the one training loop of the project.

Shaped as small functions so a Ray worker calls the same code: `make_optimizer`, `train_step`
(with an `after_backward` hook where gradients get all-reduced), `train_epoch`, `evaluate`, and
`fit` which ties them together with progress bars, per-epoch validation and the checkpoint folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.errors import SuperweightsError

from .checkpoint import save_checkpoint
from .config import Config
from .data import DataSplits, Loader, load_data
from .exits import anytime_record, write_anytime
from .metrics import ensemble_report
from .model import StackedEnsemble, build_ensemble


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SuperweightsError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SuperweightsError(f"--device must be cpu or cuda, got {name!r}")
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

    With exits (`model.has_exits`) the loss sums every exit (DESIGN.md step 9), else every member's last."""
    if getattr(model, "has_exits", False):
        outs = model.forward_exits_list(x, members)
        loss = exit_loss(outs, y, getattr(model, "exit_weights", ()))
        return loss, torch.stack([o[:, -1] for o in outs], dim=1)
    logits = model(x, members)
    return ensemble_loss(logits, y), logits


def train_step(model, x, y, optimizer, scheduler, after_backward: Callable[[nn.Module], None] | None = None,
               members: list[int] | None = None):
    """One optimisation step. `members`: compute the loss of these members only (member-parallel workers);
    `after_backward(model)`: runs between backward and the optimizer step (gradient all-reduce)."""
    loss, logits = model_loss(model, x, y, members)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward(model)
    optimizer.step()
    scheduler.step()
    return loss.detach(), logits.detach()


def train_epoch(model, loader: Loader, optimizer, scheduler, device, epoch: int, progress: bool = True,
                desc: str = "", after_backward=None) -> dict:
    model.train()
    loader.set_epoch(epoch)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits = train_step(model, x, y, optimizer, scheduler, after_backward)
        total_loss += float(loss) * len(y)
        correct += int((logits.softmax(-1).mean(1).argmax(-1) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


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


@dataclass
class FitResult:
    model: StackedEnsemble
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # test metrics, the metrics.json content
    out_dir: Path | None = None


def fit(config: Config, out_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
        log: Callable[[str], None] = print, data: DataSplits | None = None) -> FitResult:
    """Train the configured ensemble, validate every epoch, test at the end, write the checkpoint."""
    dev = resolve_device(device)
    t = config.train
    data = data or load_data(config.data, t.seed, t.batch_size, t.eval_batch_size)
    plan = None
    if config.bank.method == "superweights" and config.bank.grouping == "gradient":
        from .grouping import gradient_regroup  # grouping builds on this module's training step

        plan = gradient_regroup(config, data, dev, log, progress)
    if config.bank.method == "ssn" and config.bank.ssn_groups == "learned":
        from .ssn_model import learned_ssn_plan  # lazy: ssn_model builds on this module

        b = config.bank
        plan = learned_ssn_plan(config, data.info, data, dev, b.pretrain_steps, b.upsample, b.groups,
                                b.max_templates, b.budget)
        log(f"learned SSN groups: {len(plan.groups)} k-means groups after {b.pretrain_steps} pre-training steps")
    model = build_ensemble(config, data.info, plan).to(dev)
    optimizer, scheduler = make_optimizer(model, config, len(data.train))
    history = []
    for epoch in range(t.epochs):
        start = time.perf_counter()
        row = train_epoch(model, data.train, optimizer, scheduler, dev, epoch, progress, f"epoch {epoch + 1}/{t.epochs}")
        val = evaluate(model, data.val, dev)
        row.update(epoch=epoch + 1, val_accuracy=val["ensemble"]["accuracy"], val_nll=val["ensemble"]["nll"],
                   seconds=time.perf_counter() - start)
        history.append(row)
        log(
            f"epoch {epoch + 1:3d}/{t.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
            f"val acc {row['val_accuracy']:.4f}  val nll {row['val_nll']:.4f}  ({row['seconds']:.1f}s)"
        )
        if config.bank.unshare_epoch == epoch + 1 and config.bank.method == "superweights":
            from .grouping import unshare_coefficients

            row["unshared_pairs"] = unshare_coefficients(model, optimizer, data.train, config, dev, epoch)
            log(f"coefficient unsharing after epoch {epoch + 1}: {row['unshared_pairs']} slot pairs stopped sharing "
                f"({model.plan.num_coef_sets} coefficient sets, {model.plan.coefficient_params:,} coefficients)")
    metrics = evaluate(model, data.test, dev)
    result = FitResult(model=model, history=history, metrics=metrics)
    if out_dir is not None:
        result.out_dir = save_checkpoint(out_dir, config, data.info, model, metrics, history)
        # Exits, per-step FLOPs and the schedule (greedy on validation data) for anytime prediction.
        write_anytime(result.out_dir, anytime_record(model, config, data.info, data.val, dev))
    return result


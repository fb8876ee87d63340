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
from .metrics import ensemble_report
from .model import StackedEnsemble, build_ensemble


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SuperweightsError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise SuperweightsError(f"--device must be cpu or cuda, got {name!r}")
    return torch.device(name)


def make_optimizer(model: StackedEnsemble, config: Config, steps_per_epoch: int):
    """SGD + Nesterov momentum; weight decay on everything except coefficients; per-step cosine LR."""
    t = config.train
    coef = [p for n, p in model.named_parameters() if n.endswith("bank.coefficients")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("bank.coefficients")]
    groups = [{"params": rest, "weight_decay": t.weight_decay}]
    if coef:
        groups.append({"params": coef, "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    total = max(1, t.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return opt, sched


def ensemble_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Sum over members of cross-entropy on the same batch. logits (B, M, C)."""
    b, m, c = logits.shape
    return F.cross_entropy(logits.reshape(b * m, c), y.repeat_interleave(m), reduction="sum") / b


def train_step(model, x, y, optimizer, scheduler, after_backward: Callable[[nn.Module], None] | None = None,
               members: list[int] | None = None):
    """One optimisation step. `members`: compute the loss of these members only (member-parallel workers);
    `after_backward(model)`: runs between backward and the optimizer step (gradient all-reduce)."""
    logits = model(x, members)
    loss = ensemble_loss(logits, y)
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
    model = build_ensemble(config, data.info).to(dev)
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
    metrics = evaluate(model, data.test, dev)
    result = FitResult(model=model, history=history, metrics=metrics)
    if out_dir is not None:
        result.out_dir = save_checkpoint(out_dir, config, data.info, model, metrics, history)
    return result


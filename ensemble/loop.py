"""THE training loop: every training in the project is `run(...)` (`superweights train` on any number of
Ray workers, 0 included, `python -m ray_jobs.train`, every `compare` child, `fit`).

The method's learning steps are phases of this loop, on every worker layout (`Collective`). Whether and
when each runs is the bank-method table's answer (`method_of(config).steps`, a `LearningSteps` of
`ensemble.bank_method`): the loop asks it and never names a method itself.

    plan = learned SSN groups (pre-training + k-means, rank 0, broadcast)   if bank.ssn_groups = "learned"
    for epoch in warm-up epochs (bank.grouping = "gradient") + train.epochs:
        one pass over the batches: train_step(comm.view, ...) per batch (`Accelerator.step`: train.precision,
            train.channels_last, train.compile)
        sync BN statistics; rank 0 validates and reports the epoch
        after the last warm-up epoch: slot gradients (summed over workers) -> gradient plan -> a fresh,
            re-initialised model and optimizer on it
        after training epoch bank.unshare_epoch: per-member coefficient gradients -> unsharing
        checkpoint (every `session.checkpoint_every` epochs and at the end; the last one with test
            metrics and what `session.finish` adds: the training pipeline's anytime record)

A checkpoint holds the current plan (plan.json), so a run that crashes after regrouping or unsharing
resumes on the learned plan, and the optimizer/LR schedule of its phase. Where checkpoints go and what
is reported is the `Session`'s business: `fit` keeps only the final folder, the Ray worker
(`ray_jobs.worker`) reports to Ray Train and MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.errors import SuperweightsError

from .collective import Collective
from .config import Config
from .data import DataSplits, load_data
from .grouping import regroup_plan, unshare_coefficients
from .methods import build_ensemble, make_ssn_plan, method_of
from .model import StackedEnsemble
from .ssn_model import learned_ssn_groups
from .train_state import read_train_state, restore_into, write_train_state
from .training import Accelerator, evaluate, make_optimizer, resolve_device


class Diverged(SuperweightsError):
    """Training produced a non-finite loss or weight: the run stops there; nothing is written as final."""


def diverged_message(config: Config, where: str, what: str) -> str:
    t, b = config.train, config.bank
    hint = f"lower train.lr (now {t.lr:g})"
    if method_of(config).has_bank:
        hint += f"; a very small bank.budget (now {b.budget:g}) can also make training unstable"
    return f"training diverged at {where}: {what} is not finite (NaN or infinity); {hint}"


def warmup_epochs(config: Config) -> int:
    """Epochs on depth-bin groups before gradient regrouping (the method's `LearningSteps`; 0 = none)."""
    return method_of(config).steps.warmup_epochs(config)


def total_epochs(config: Config) -> int:
    return warmup_epochs(config) + config.train.epochs


class Session:
    """What the loop does with checkpoints and epoch reports. This default (used by `fit`) resumes nothing,
    checkpoints only at the end, into `final_dir` (if given), and prints nothing."""

    checkpoint_every = 0  # 0 = only the final epoch

    def __init__(self, final_dir: str | Path | None = None, finish: Callable | None = None):
        """`finish(folder, model, config, data, device)`: writes what the layers above `ensemble` add to the
        final checkpoint (the training pipeline passes `anytime.record.finish_checkpoint`, the anytime record)."""
        self.final_dir = None if final_dir is None else Path(final_dir).absolute()
        self.finish = finish

    def restore_dir(self):
        """A context manager yielding the folder to resume from, or None."""
        return nullcontext(None)

    def on_resume(self, state: dict) -> None:
        """The train_state.json content of the checkpoint resumed from (e.g. the MLflow run id)."""

    def resumed_complete(self) -> None:
        """Called when the checkpoint resumed from is already the final one (nothing left to train)."""

    def before_step(self, epoch: int, step: int, steps: int) -> None:
        """Before every training step (fault injection for tests)."""

    def on_epoch(self, row: dict, epochs: int) -> None:
        """Main rank, after each epoch (and its method step)."""

    def state_extra(self) -> dict:
        """Extra fields for train_state.json (e.g. the MLflow run id)."""
        return {}

    def save(self, epoch: int, write: Callable[[Path], Path] | None, report: dict, final: bool,
             test_metrics: dict) -> None:
        """Every rank, at a checkpoint epoch; `write(folder)` (main rank only, else None) writes the folder;
        `test_metrics` (main rank, final epoch) is the metrics.json content."""
        if final and write is not None and self.final_dir is not None:
            write(self.final_dir)


@dataclass
class LoopResult:
    model: StackedEnsemble
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # test metrics (main rank; empty when nothing was left to train)
    start_epoch: int = 0
    resumes: list[int] = field(default_factory=list)


def epoch_line(row: dict, epochs: int) -> str:
    phase = "warm-up " if row.get("phase") == "warm-up" else ""
    return (f"{phase}epoch {row['epoch']:3d}/{epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
            f"val acc {row['val_accuracy']:.4f}  val nll {row['val_nll']:.4f}  ({row['seconds']:.1f}s)")


def _fresh(config: Config, data: DataSplits, plan, device, epochs: int, accel: Accelerator):
    model = accel.prepare(build_ensemble(config, data.info, plan, accel.channels_last).to(device))
    optimizer, scheduler = make_optimizer(model, config, len(data.train), epochs=epochs)
    return model, optimizer, scheduler


def initial_plan(config: Config, data: DataSplits, device, comm: Collective, log: Callable[[str], None]):
    """The plan the first epoch trains on: None (from the config) except for learned SSN groups, which rank 0
    finds by pre-training (deterministic under train.seed) and broadcasts, so every worker builds the same."""
    if not method_of(config).steps.pretrains(config):
        return None
    b = config.bank
    groups = None
    if comm.is_main:
        groups = learned_ssn_groups(config, data.info, data, device, b.pretrain_steps, b.groups, b.max_templates)
    groups = comm.broadcast_ints(groups)
    plan = make_ssn_plan(config, data.info, b.upsample, "learned", b.max_templates, b.budget, groups)
    if comm.is_main:
        log(f"learned SSN groups: {len(plan.groups)} k-means groups after {b.pretrain_steps} pre-training steps")
    return plan


def run(config: Config, data: DataSplits, device, comm: Collective | None = None, session: Session | None = None,
        log: Callable[[str], None] = print, progress: bool = False) -> LoopResult:
    """Train (or resume) the configured ensemble; see the module docstring."""
    comm = comm or Collective()
    session = session or Session()
    device = torch.device(device)
    accel = Accelerator(config, device, data.info)  # train.precision / channels_last / compile (refuses bf16 where unsupported)
    t = config.train
    learning = method_of(config).steps  # when the method's learning steps run
    warm = learning.warmup_epochs(config)
    total = warm + t.epochs
    history: list[dict] = []
    resumes: list[int] = []
    start = 0
    with session.restore_dir() as folder:
        if folder is not None:
            state, plan = read_train_state(Path(folder))
            start = int(state["epoch"])
            session.on_resume(state)
            model, optimizer, scheduler = _fresh(config, data, plan, device, warm if start < warm else t.epochs, accel)
            restore_into(Path(folder), model, optimizer, scheduler, device)
            history, resumes = list(state["history"]), list(state.get("resumes", [])) + [start]
            if comm.is_main:
                log(f"resumed from {folder} at epoch {start}/{total}")
        else:
            plan = initial_plan(config, data, device, comm, log)
            model, optimizer, scheduler = _fresh(config, data, plan, device, warm or t.epochs, accel)
    comm.attach(model)
    if start >= total:
        session.resumed_complete()
    loader = comm.shard(data.train)
    every = session.checkpoint_every
    metrics: dict = {}
    for epoch in range(start, total):
        began = time.perf_counter()
        model.train()
        loader.set_epoch(epoch)
        steps = len(loader)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{total}", leave=False, unit="batch",
                   disable=not (progress and comm.is_main))
        for step, (x, y) in enumerate(bar):
            session.before_step(epoch, step, steps)
            x, y = accel.inputs(x), y.to(device, non_blocking=True)
            comm.begin(step, y)
            loss, logits = accel.step(comm.view, x, y, optimizer, scheduler, comm.after_backward, comm.members)
            if not comm.step_finite(loss):
                raise Diverged(diverged_message(config, f"epoch {epoch + 1}, step {step + 1}", "the training loss"))
            step_loss, step_correct, step_seen = comm.step_stats(loss, logits, y)
            loss_sum, correct, seen = loss_sum + step_loss, correct + step_correct, seen + step_seen
            if seen:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        comm.sync_buffers(model)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # identical on every worker
            raise Diverged(diverged_message(config, f"the end of epoch {epoch + 1}", "a weight"))
        loss_sum = comm.sum_float(loss_sum)  # member groups and replicas add up
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "train_seconds": time.perf_counter() - began}  # the steps alone, without the validation pass
        if warm:
            row["phase"] = "warm-up" if epoch < warm else "train"
        val = None
        if comm.is_main:
            val = evaluate(model, data.val, device)
            row.update(val_accuracy=val["ensemble"]["accuracy"], val_nll=val["ensemble"]["nll"],
                       seconds=time.perf_counter() - began)
            log(epoch_line(row, total))
        # -- the method's learning steps (collective: every rank takes part) --
        if learning.regroups_after(config, epoch + 1):
            depth_groups = len(model.plan.groups)
            plan, used = regroup_plan(model, loader, config, device, warm, comm)
            model, optimizer, scheduler = _fresh(config, data, plan, device, t.epochs, accel)
            comm.attach(model)
            row.update(groups=len(plan.groups), grouping_threshold=used)
            if comm.is_main:
                log(f"gradient grouping: {depth_groups} depth groups -> {len(plan.groups)} groups at threshold "
                    f"{used:.3g} ({len(plan.blocks)} blocks, budget {plan.bank_params:,} exact); model re-initialised")
        if learning.unshares_after(config, epoch + 1):
            pairs = unshare_coefficients(model, optimizer, loader, config, device, epoch, comm)
            comm.attach(model)
            row.update(unshared_pairs=pairs, coefficient_sets=model.plan.num_coef_sets,
                       coefficient_params=model.plan.coefficient_params)
            if comm.is_main:
                log(f"coefficient unsharing after epoch {epoch + 1 - warm}: {pairs} slot pairs stopped sharing "
                    f"({model.plan.num_coef_sets} coefficient sets, {model.plan.coefficient_params:,} coefficients)")
        if comm.is_main:
            row["ended_at"] = time.time()
            history.append(row)
            session.on_epoch(row, total)
        last = epoch + 1 == total
        if not (last or (every and (epoch + 1) % every == 0)):
            continue
        report: dict = {"epoch": epoch + 1}
        write = None
        if comm.is_main:
            report.update(row)
            saved = {**val, "split": "val"}
            if last:
                metrics = evaluate(model, data.test, device)
                saved = {**metrics, "split": "test"}
                report.update(test_accuracy=metrics["ensemble"]["accuracy"], test_nll=metrics["ensemble"]["nll"])

            write = partial(_write_folder, config=config, data=data, model=model, optimizer=optimizer,
                            scheduler=scheduler, metrics=saved, history=history, epoch=epoch + 1, resumes=resumes,
                            extra=session.state_extra(), finish=session.finish if last else None, device=device)
        session.save(epoch + 1, write, report, last, metrics)
    return LoopResult(model, history, metrics, start, resumes)


def _write_folder(folder: Path, *, config, data, model, optimizer, scheduler, metrics, history, epoch, resumes,
                  extra, finish: Callable | None, device) -> Path:
    write_train_state(folder, config, data.info, model, optimizer, scheduler, metrics, history, epoch, resumes, extra)
    if finish is not None:  # the final checkpoint: e.g. the anytime record (greedy schedule on validation data)
        finish(folder, model, config, data, device)
    return Path(folder)


@dataclass
class FitResult:
    model: StackedEnsemble
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # test metrics, the metrics.json content
    out_dir: Path | None = None


def fit(config: Config, out_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
        log: Callable[[str], None] = print, data: DataSplits | None = None,
        finish: Callable | None = None) -> FitResult:
    """`run` in this process, no Ray, no resume: the final checkpoint folder goes to `out_dir` (if given), with
    what `finish` adds (`Session`). `superweights train --workers 0` runs the same loop through Ray Train's
    local mode."""
    dev = resolve_device(device)
    t = config.train
    data = data or load_data(config.data, t.seed, t.batch_size, t.eval_batch_size, dev)
    session = Session(out_dir, finish)
    result = run(config, data, dev, session=session, log=log, progress=progress)
    return FitResult(result.model, result.history, result.metrics, session.final_dir)

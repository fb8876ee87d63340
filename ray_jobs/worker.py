"""The Ray Train worker loop: `train_loop(spec)` runs on every worker (or in-process with 0 workers).

It owns no training logic of its own: every step is `ensemble.training.train_step` (with this worker's
members and the `StepSync` all-reduce as `after_backward`), validation/test are `evaluate`, checkpoints are
`save_checkpoint` plus the optimizer/scheduler state and a small JSON with the epoch, the history and the
MLflow run id. What this module adds is the parallel bookkeeping around those calls:

    for epoch in range(start, epochs):          # start = last checkpoint's epoch (resume)
        for each global batch: slice -> train_step(model, x, y, opt, sched, sync, members)
        gather BN running stats from their owners; rank 0: validate, print, log to MLflow
        every `checkpoint_every` epochs and at the end: ray.train.report(metrics, checkpoint)

Checkpoint folder = a regular `ensemble.checkpoint` folder (weights.safetensors, plan.json, config.json,
metrics.json: `load_checkpoint` reads it) + optimizer.pt (tensors and numbers only; read back with
`torch.load(weights_only=True)`) + train_state.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ensemble.checkpoint import save_checkpoint
from ensemble.config import from_dict
from ensemble.data import load_data
from ensemble.exits import ANYTIME_FILE, anytime_record, write_anytime
from ensemble.model import build_ensemble
from ensemble.training import evaluate, make_optimizer, resolve_device, train_step

from .parallel import Layout, StepSync, gather_member_buffers, sum_over_workers

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
MODEL_FILES = ("weights.safetensors", "plan.json", "config.json", "metrics.json", ANYTIME_FILE)


class InjectedCrash(RuntimeError):
    """Raised by `debug.crash_at_epoch` to test fault tolerance."""


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def latest_local_checkpoint(run_dir: Path) -> Path | None:
    """In-process runs (0 workers) persist checkpoints themselves; the newest complete one."""
    done = sorted(p for p in run_dir.glob("checkpoint_epoch_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:3d}/{epochs}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
            f"val acc {row['val_accuracy']:.4f}  val nll {row['val_nll']:.4f}  ({row['seconds']:.1f}s)")


def _slice_of(step: int, n: int, batch_size: int, replica: int, replicas: int) -> tuple[int, int, int]:
    """(global batch size, slice start within the batch, slice length): `Loader.shard`'s split."""
    b = min(batch_size, n - step * batch_size)
    q, r = divmod(b, replicas)
    start = replica * q + min(replica, r)
    return b, start, q + (1 if replica < r else 0)


def train_loop(spec: dict) -> dict:
    import ray.train

    _quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config = from_dict(spec["config"])
    layout = Layout.from_dict(spec["layout"])
    if layout.world != world:
        raise RuntimeError(f"layout is for {layout.world} workers but Ray started {world}")
    run_dir = Path(spec["run_dir"])
    local = spec["local"]
    if local:
        device = resolve_device(spec.get("device", "cpu"))
    else:
        import ray.train.torch

        device = ray.train.torch.get_device() if spec.get("use_gpu") else torch.device("cpu")
    t = config.train
    data = load_data(config.data, t.seed, t.batch_size, t.eval_batch_size)
    model = build_ensemble(config, data.info).to(device)
    members = layout.members_of(rank)
    replica, replicas = layout.replica_of(rank), layout.data_replicas
    sync = StepSync(model, layout, rank, data.info.num_classes) if world > 1 else None
    optimizer, scheduler = make_optimizer(model, config, len(data.train))

    start_epoch, history, run_id, resumes = 0, [], spec.get("run_id"), []
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and local:
        found = latest_local_checkpoint(run_dir)
        ckpt = ray.train.Checkpoint.from_directory(str(found)) if found else None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = restore(Path(d), model, optimizer, scheduler, device)
        start_epoch, history = int(state["epoch"]), list(state["history"])
        run_id = state.get("mlflow_run_id") or run_id
        resumes = list(state.get("resumes", [])) + [start_epoch]
        if rank == 0:
            _say(f"resumed from {ckpt.path} at epoch {start_epoch}/{t.epochs}")

    tracker = None
    if rank == 0 and spec.get("tracking_uri") and run_id:
        from .tracking import RunLogger

        tracker = RunLogger(spec["tracking_uri"], run_id)

    loader = data.train.shard(replica, replicas) if replicas > 1 else data.train
    n_train = data.train.num_examples
    crash_epoch = int(spec.get("crash_at_epoch") or 0)
    every = max(1, int(spec.get("checkpoint_every", 1)))
    if start_epoch >= t.epochs and local and ckpt is not None:
        ray.train.report({"epoch": start_epoch}, checkpoint=ckpt)  # nothing left to do: hand back the final one
    final_metrics = None
    for epoch in range(start_epoch, t.epochs):
        began = time.perf_counter()
        model.train()
        loader.set_epoch(epoch)
        crash_step = len(loader) // 2 if crash_epoch == epoch + 1 and rank == world - 1 else -1
        total_loss, correct, seen = 0.0, 0, 0
        for step, (x, y) in enumerate(loader):
            if step == crash_step:
                _maybe_crash(run_dir, crash_epoch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if sync is None:
                loss, logits = train_step(model, x, y, optimizer, scheduler, None, members)
                total_loss += float(loss) * len(y)
                correct += int((logits.softmax(-1).mean(1).argmax(-1) == y).sum())
                seen += len(y)
                continue
            batch, start, length = _slice_of(step, n_train, t.batch_size, replica, replicas)
            assert length == len(y), (length, len(y))
            sync.begin(y, batch, start)
            loss, _ = train_step(sync.model, x, y, optimizer, scheduler, sync, members)
            if len(y):  # the slice's loss: mean over the slice of its members' losses (NaN when empty)
                total_loss += float(loss) * len(y)
            correct += sync.correct
            seen += batch
        if sync is not None:
            gather_member_buffers(model, layout, rank)
            total_loss = sum_over_workers(total_loss, device)  # member groups and replicas add up
        last = epoch + 1 == t.epochs
        save = last or (epoch + 1) % every == 0
        row = {"epoch": epoch + 1, "train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
        report_metrics: dict = {"epoch": epoch + 1}
        tmp = None
        if rank == 0:
            val = evaluate(model, data.val, device)
            row.update(val_accuracy=val["ensemble"]["accuracy"], val_nll=val["ensemble"]["nll"],
                       seconds=time.perf_counter() - began, ended_at=time.time())
            history.append(row)
            _say(epoch_line(row, t.epochs))
            if tracker is not None:
                tracker.log_epoch(epoch + 1, row)
            report_metrics.update(row)
            if save:
                metrics = {**val, "split": "val"}
                if last:
                    final_metrics = evaluate(model, data.test, device)
                    metrics = {**final_metrics, "split": "test"}
                    report_metrics.update(test_accuracy=final_metrics["ensemble"]["accuracy"],
                                          test_nll=final_metrics["ensemble"]["nll"])
                name = checkpoint_dir_name(epoch + 1)
                tmp = run_dir / name if local else Path(tempfile.mkdtemp(prefix="superweights-ckpt-"))
                write_checkpoint(tmp, config, data.info, model, optimizer, scheduler, metrics, history,
                                 epoch + 1, run_id, layout, resumes)
                if last:  # as `fit` does: exits, per-step FLOPs and the anytime schedule (greedy on val)
                    write_anytime(tmp, anytime_record(model, config, data.info, data.val, device))
                if last and tracker is not None:
                    tracker.log_final(final_metrics, epoch + 1)
                    tracker.log_artifacts(tmp, MODEL_FILES)
        if save:
            checkpoint = ray.train.Checkpoint.from_directory(str(tmp)) if tmp is not None else None
            ray.train.report(report_metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch + 1))
            if tmp is not None and not local:
                shutil.rmtree(tmp, ignore_errors=True)
    return {"epochs": t.epochs, "start_epoch": start_epoch}


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report at INFO under a logger named by its file path (so RunConfig's
    LoggingConfig, which filters `ray.train.*`, misses it): one line per worker per checkpoint is noise."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: its logs stay as they are
        pass


def _say(line: str) -> None:
    """One line on the worker's stdout, which Ray forwards to the driver. Not `print`: Ray Train patches it
    to also go through its logger, so every line would show twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _maybe_crash(run_dir: Path, epoch: int) -> None:
    """Crash on the first attempt only: a marker file in the run's storage folder remembers it happened."""
    marker = run_dir / f".crash_injected_epoch_{epoch}"
    if marker.exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("injected\n")
    raise InjectedCrash(f"debug.crash_at_epoch={epoch}: injected worker crash (first attempt only)")


def write_checkpoint(folder: Path, config, info, model, optimizer, scheduler, metrics: dict, history: list[dict],
                     epoch: int, run_id: str | None, layout: Layout, resumes: list[int] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder, config, info, model, metrics, history)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / OPTIMIZER_FILE)
    state = {"epoch": epoch, "history": history, "mlflow_run_id": run_id, "layout": layout.to_dict(),
             "resumes": list(resumes)}  # epochs training was resumed at (restarts and reruns)
    # Written last: its presence marks the folder complete.
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return folder


def restore(folder: Path, model, optimizer, scheduler, device) -> dict:
    """Load model + optimizer + scheduler state in place; returns train_state.json (epoch, history, ...)."""
    from safetensors.torch import load_file

    state = json.loads((folder / STATE_FILE).read_text())
    model.load_state_dict(load_file(str(folder / "weights.safetensors"), device=str(device)))
    opt = torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return state

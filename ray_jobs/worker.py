"""The Ray Train worker: `train_loop(spec)` runs on every worker (or in-process with 0 workers).

It owns no training logic: it loads the data, picks the worker's `Collective` (`WorkerCollective` for a
multi-worker layout, the one-process one otherwise) and runs THE training loop, `ensemble.loop.run`,
with a `RaySession` that connects the loop to Ray Train and MLflow:

* resume: `ray.train.get_checkpoint()` (a restarted worker group), else, in-process, the newest complete
  `checkpoint_epoch_*` folder of the run (a rerun with the same name);
* every `checkpoint_every` epochs and at the end: the checkpoint folder (`ensemble.train_state`) goes to
  `ray.train.report(metrics, checkpoint)`; rank 0 logs each epoch to MLflow, and at the end the test
  metrics and the model files;
* the run folder may be a URI (s3://, gs://, file://; `ray_jobs.storage_uri`): a worker group's checkpoints
  are uploaded by Ray Train, the in-process ones (0 workers, which Ray Train's local mode does not persist)
  are written locally and uploaded here; a checkpoint to resume from is downloaded by `as_directory`;
* `debug.crash_at_epoch`: the last rank raises half-way through that epoch, on the first attempt only.
"""

from __future__ import annotations

import posixpath
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from anytime.record import ANYTIME_FILE, finish_checkpoint
from ensemble.collective import Collective
from ensemble.config import from_dict
from ensemble.data import load_data
from ensemble.loop import Diverged, Session, run
from ensemble.train_state import STATE_FILE, latest_complete
from ensemble.training import resolve_device

from .parallel import Layout, WorkerCollective
from .storage_uri import Location, location
from .storage_uri import latest_complete as latest_complete_at

DIVERGED_FILE = "diverged.txt"  # in the run folder: why the last attempt stopped (read by the driver)
MODEL_FILES = ("weights.safetensors", "plan.json", "config.json", "metrics.json", ANYTIME_FILE)
__all__ = ["MODEL_FILES", "STATE_FILE", "latest_local_checkpoint", "train_loop"]


class InjectedCrash(RuntimeError):
    """Raised by `debug.crash_at_epoch` to test fault tolerance."""


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def latest_local_checkpoint(run_dir: Path | Location) -> Path | Location | None:
    """The newest complete checkpoint folder of a run, on the run's storage: a Path for a Path run folder,
    a `Location` for a Location (which may be a URI)."""
    if isinstance(run_dir, Location):
        return latest_complete_at(run_dir)
    return latest_complete(run_dir)


class RaySession(Session):
    def __init__(self, spec: dict, rank: int, world: int, layout: Layout):
        super().__init__(finish=finish_checkpoint)  # the final checkpoint gets the anytime record
        import ray.train

        self.train = ray.train
        self.spec, self.rank, self.world, self.layout = spec, rank, world, layout
        self.run = location(spec["run_dir"])  # a path or a URI (the driver's `str` of it)
        self.local = spec["local"]
        self.checkpoint_every = max(1, int(spec.get("checkpoint_every", 1)))
        self.crash_epoch = int(spec.get("crash_at_epoch") or 0)
        self.run_id = spec.get("run_id")
        self._checkpoint = None
        self._tracker = None

    def restore_dir(self):
        # The newest complete checkpoint wins: Ray's own record (`get_checkpoint`) can be behind the folders on
        # the run's storage, or empty on a rerun after Ctrl-C, when the driver stopped before Ray registered
        # the last report. In-process runs persist their checkpoints themselves and only have the folders.
        ckpt = self.train.get_checkpoint()
        found = latest_complete_at(self.run)
        if found is not None and (ckpt is None or found.name > posixpath.basename(ckpt.path.rstrip("/"))):
            ckpt = self.train.Checkpoint(path=found.path, filesystem=found.fs)
        self._checkpoint = ckpt
        # a local folder as it is; one on remote storage is downloaded to a temporary folder, removed after
        return ckpt.as_directory() if ckpt is not None else nullcontext(None)

    def on_resume(self, state: dict) -> None:
        self.run_id = state.get("mlflow_run_id") or self.run_id

    @property
    def tracker(self):
        """Rank 0's MLflow logger, made on first use (after a resume has told the run id)."""
        if self._tracker is None and self.rank == 0 and self.spec.get("tracking_uri") and self.run_id:
            from .tracking import RunLogger

            self._tracker = RunLogger(self.spec["tracking_uri"], self.run_id)
        return self._tracker

    def resumed_complete(self) -> None:
        if self.local and self._checkpoint is not None:  # nothing left to do: hand back the final one
            self.train.report({"epoch": -1}, checkpoint=self._checkpoint)

    def before_step(self, epoch: int, step: int, steps: int) -> None:
        if self.crash_epoch == epoch + 1 and self.rank == self.world - 1 and step == steps // 2:
            _maybe_crash(self.run, self.crash_epoch)

    def on_epoch(self, row: dict, epochs: int) -> None:
        if self.tracker is not None:
            self.tracker.log_epoch(row["epoch"], row)

    def state_extra(self) -> dict:
        return {"mlflow_run_id": self.run_id, "layout": self.layout.to_dict()}

    def save(self, epoch, write, report, final, test_metrics) -> None:
        tmp = checkpoint = None
        # In-process on a local run folder the checkpoint is written in place; anywhere else in a temporary
        # folder, which Ray Train (workers) or `upload` below (in-process: Ray's local mode persists nothing)
        # copies to the run's storage.
        in_place = self.local and self.run.local is not None
        if write is not None:
            tmp = self.run.local / checkpoint_dir_name(epoch) if in_place else \
                Path(tempfile.mkdtemp(prefix="superweights-ckpt-"))
            write(tmp)
            if final and self.tracker is not None:
                self.tracker.log_final(test_metrics, epoch)
                self.tracker.log_artifacts(tmp, MODEL_FILES)
            if self.local and not in_place:
                dest = self.run / checkpoint_dir_name(epoch)
                dest.upload(tmp)
                checkpoint = self.train.Checkpoint(path=dest.path, filesystem=dest.fs)
            else:
                checkpoint = self.train.Checkpoint.from_directory(str(tmp))
        self.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(epoch))
        if tmp is not None and not in_place:
            shutil.rmtree(tmp, ignore_errors=True)


def train_loop(spec: dict) -> dict:
    import ray.train

    _quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config = from_dict(spec["config"])
    layout = Layout.from_dict(spec["layout"])
    if layout.world != world:
        raise RuntimeError(f"layout is for {layout.world} workers but Ray started {world}")
    if spec["local"]:
        device = resolve_device(spec.get("device", "cpu"))
    else:
        import ray.train.torch

        device = ray.train.torch.get_device() if spec.get("use_gpu") else torch.device("cpu")
        torch.set_num_threads(int(spec.get("threads", 1)))  # the CPUs this worker reserved
    t = config.train
    data = load_data(config.data, t.seed, t.batch_size, t.eval_batch_size, device)
    if world > 1:
        comm = WorkerCollective(layout, rank, data.info.num_classes, data.train.num_examples, t.batch_size, device)
    else:
        comm = Collective()
    session = RaySession(spec, rank, world, layout)
    try:
        result = run(config, data, device, comm, session, log=_say)
    except Diverged as e:
        # Every rank stops at the same step (`Collective.step_finite`). Returning instead of raising keeps Ray
        # Train from restarting the group from the last checkpoint, only to diverge again; the driver reads
        # the reason from the run folder and fails the run with it.
        if rank == 0:
            (location(spec["run_dir"]) / DIVERGED_FILE).write_text(str(e) + "\n")
        return {"diverged": str(e)}
    return {"epochs": t.epochs, "start_epoch": result.start_epoch}


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


def _maybe_crash(run: Location, epoch: int) -> None:
    """Crash on the first attempt only: a marker file in the run's storage folder remembers it happened."""
    marker = run / f".crash_injected_epoch_{epoch}"
    if marker.is_file():
        return
    marker.write_text("injected\n")
    raise InjectedCrash(f"debug.crash_at_epoch={epoch}: injected worker crash (first attempt only)")

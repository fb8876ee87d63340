"""`fit`: one `TorchTrainer.fit()` of the worker loop with the driver's scaling, failure and checkpoint configs.

In a helper thread when the driver started Ray (so ^C stays a KeyboardInterrupt, see `driver.train`); a
worker's failure becomes one `SuperweightsError` line naming the last checkpoint to resume from.
"""

from __future__ import annotations

import logging
import threading

from core.errors import SuperweightsError

from .options import RayOptions
from .ray_cluster import worker_cpus
from .storage_uri import Location
from .worker import latest_local_checkpoint


def _worker_error(e: BaseException) -> str:
    failures = getattr(e, "worker_failures", None) or {}
    for rank, err in sorted(failures.items()):
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, SuperweightsError):
            return str(cause)
        text = " ".join(str(cause).split())
        return f"worker {rank}: {type(cause).__name__}: {text[:300]}"
    return " ".join(str(e).split())[:300]


def _fit_in_thread(trainer):
    """`trainer.fit()` in a daemon thread; the main thread waits for it, and stays interruptible by ^C."""
    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread as it is
            box["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def fit(spec: dict, workers: int, options: RayOptions, run_name: str, storage: Location, in_thread: bool = False):
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    from .worker import train_loop

    if workers == 0:  # local mode logs its start and every report at INFO on the driver's console
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    resources = {"CPU": worker_cpus(workers, options.cpus_per_worker)}
    if options.use_gpu:
        resources["GPU"] = 1
    spec = {**spec, "threads": resources["CPU"]}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=options.use_gpu,
                                     resources_per_worker=resources if workers else None),
        # a URI as the user gave it: Ray Train opens it with pyarrow.fs itself, on the controller and every worker
        run_config=RunConfig(name=run_name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=options.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")),  # our own lines, not Ray's
    )
    try:
        return _fit_in_thread(trainer) if in_thread else trainer.fit()
    except TrainingFailedError as e:
        last = latest_local_checkpoint(storage / run_name)
        advice = (f"; the last checkpoint is {last}: rerun with --name {run_name} to resume" if last is not None
                  else "; no checkpoint was written")
        raise SuperweightsError(f"training failed ({_worker_error(e)}){advice}") from e

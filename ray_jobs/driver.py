"""The Ray Train driver: checks, MLflow run, `TorchTrainer.fit`, outcome.

`train(config, options, ...)` is what `superweights train` and `python -m ray_jobs.train` call:

1. fail fast, before anything starts: options, tracking URI (server reachable? SQLite path absolute?),
   Ray address reachable, data present, plan fits the budget, workers (x `cpus_per_worker`) <= CPUs (Ray
   itself would wait forever for CPUs that do not exist), batch divisible by the data replicas;
2. lay the workers out as `member_groups x data_replicas` (members balanced by FLOPs);
3. create the MLflow run (or re-open it when `<storage>/<name>` already holds this run: resume);
4. `TorchTrainer(train_loop, ScalingConfig(num_workers, use_gpu, resources_per_worker),
   RunConfig(name, storage_path, FailureConfig(max_failures)))`. `num_workers=0` runs the very same loop
   in this process (Ray Train V2 local mode): one code path;
5. end the MLflow run FINISHED, or FAILED/KILLED on any error, and copy the final model files to `out`.

`RayOptions` holds the config's `[ray]` (and `[debug]`) settings, which command-line flags override.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from core.errors import SuperweightsError
from ensemble.config import Config
from ensemble.training import validate_device

from .exit_codes import reinstall_sigterm
from .orphans import fail_orphaned_runs
from .parallel import Layout, available_cpus, resolve_layout
from .tracking import (
    EXPERIMENT,
    check_tracking_uri,
    default_tracking_uri,
    end_run,
    plan_params,
    set_failure_tag,
    start_run,
)
from .worker import DIVERGED_FILE, MODEL_FILES, STATE_FILE, latest_local_checkpoint

RUN_FILE = "superweights_run.json"  # in <storage>/<name>: MLflow run id + tracking URI, for resume


@dataclass(frozen=True)
class RayOptions:
    """Future `RayConfig` (`[ray]` section); kept here until ensemble/config.py grows it."""

    workers: int = -1  # Ray Train workers; -1 = min(2, CPUs); 0 = run the loop in this process
    member_groups: int = 0  # members are split over this many worker groups (0 = derive)
    data_replicas: int = 0  # each member group splits every batch over this many workers (0 = derive)
    use_gpu: bool = False  # one GPU per worker
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always checkpointed)
    max_failures: int = 1  # worker-group restarts from the last checkpoint (-1 = unlimited)
    cpus_per_worker: int = 0  # CPUs (and torch threads) per worker; 0 = the cluster's free CPUs shared evenly
    address: str = ""  # Ray cluster (host:port, ray://host:10001, auto); "" = $RAY_ADDRESS or a local Ray
    storage_path: str = "runs/ray"  # checkpoints live in <storage_path>/<run name>; made absolute
    crash_at_epoch: int = 0  # debug: one worker raises during this epoch, first attempt only (0 = off)

    @classmethod
    def from_config(cls, config: Config) -> RayOptions:
        """From `config.ray` (fields of the same names) and `config.debug.crash_at_epoch`, where they exist."""
        values = {}
        ray_section, debug = getattr(config, "ray", None), getattr(config, "debug", None)
        for f in dataclasses.fields(cls):
            if ray_section is not None and hasattr(ray_section, f.name):
                values[f.name] = getattr(ray_section, f.name)
        if debug is not None and hasattr(debug, "crash_at_epoch"):
            values["crash_at_epoch"] = debug.crash_at_epoch
        return cls(**values)

    def validate(self) -> RayOptions:
        for key, value, low in (("ray.workers", self.workers, -1), ("ray.checkpoint_every", self.checkpoint_every, 1),
                                ("ray.cpus_per_worker", self.cpus_per_worker, 0),
                                ("ray.max_failures", self.max_failures, -1), ("debug.crash_at_epoch", self.crash_at_epoch, 0)):
            if value < low:
                raise SuperweightsError(f"{key} must be >= {low}, got {value}")
        return self


@dataclass
class TrainOutcome:
    run_name: str
    run_dir: Path
    checkpoint: Path  # the final checkpoint folder in storage
    out_dir: Path | None
    metrics: dict  # test metrics (metrics.json content)
    history: list[dict]
    layout: Layout
    workers: int
    tracking_uri: str | None
    mlflow_run_id: str | None
    resumed: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _ray_address(options: RayOptions) -> str:
    return options.address or os.environ.get("RAY_ADDRESS", "")


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """A TCP connect with a short timeout: `ray.init` would otherwise retry for a long time."""
    if not address or address == "auto" or address.startswith("local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme in ("http", "https"):
        raise SuperweightsError(
            f"Ray address {address!r} is a dashboard (job submission) URL: pass the cluster's GCS address "
            "(host:6379) or ray://host:10001, or submit with `ray job submit --address "
            f"{address} -- python -m ray_jobs.train ...`"
        )
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SuperweightsError(f"Ray address {address!r} must look like host:port (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SuperweightsError(
            f"Ray cluster at {address} is not reachable ({e.strerror or type(e).__name__}); start one with "
            "`ray start --head` or leave --address empty to run a local Ray"
        ) from None


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train V2 controller flag


def _init_ray(address: str, log: Callable[[str], None]) -> bool:
    """Connect to / start Ray; True when this call started it (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]} if "RAY_AUTH_MODE" in os.environ else {}
    kwargs = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        # A job on an existing cluster: pin its processes to this cluster (Ray Train's placement-group cleaner
        # otherwise auto-detects one and raises "Found multiple active Ray instances" when another Ray runs
        # here) and no preemption watcher unless asked for (an `E core_worker ... PreemptionWatcher` line).
        env_vars.setdefault(PREEMPTION_WATCHER_ENV, os.environ.get(PREEMPTION_WATCHER_ENV, "0"))
        if "://" not in address and address != "auto":
            env_vars["RAY_ADDRESS"] = address
        # ray.init refuses an env var the submitted job's runtime env already sets (even to the same value)
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        already = (job.get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {k: v for k, v in env_vars.items() if k not in already}
        if env_vars:
            kwargs["runtime_env"] = {"env_vars": env_vars}
        ray.init(address=address, **kwargs)
        reinstall_sigterm()
        return True
    log("starting a local Ray instance ...")
    # A one-machine Ray has no node that can be drained, so Ray Train's preemption watcher has nothing to
    # watch; its actor only prints an `E core_worker ... max_restarts` line into every local run.
    env_vars.setdefault(PREEMPTION_WATCHER_ENV, os.environ.get(PREEMPTION_WATCHER_ENV, "0"))
    # Ray Train's placement-group cleaner finds "its" cluster by auto-detection, which raises (a traceback
    # in its thread) when another Ray runs on this machine. Our instance on a port we chose, named in
    # RAY_ADDRESS for every process of this job, makes auto-detection find exactly this one. Loopback only.
    port = _free_loopback_port()
    env_vars["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)  # read once, when the head node starts
    try:
        # "local": always a new instance. A bare ray.init() would join whatever cluster another session on
        # this machine started (its address is in /tmp/ray/ray_current_cluster), even a dead one.
        # No dashboard (start-up time, memory), hence no state API: Ray Train's placement-group cleaner then
        # warns every second that it cannot query it. Ray's own log level ERROR for this job's processes.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_config=ray.LoggingConfig(log_level="ERROR"), runtime_env={"env_vars": env_vars}, **kwargs)
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = previous
    reinstall_sigterm()
    return True


GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_check(workers: int, use_gpu: bool, cpus_per_worker: int = 1) -> None:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    if workers > cpus:
        raise SuperweightsError(
            f"{workers} workers need {workers} CPUs but the Ray cluster has {cpus:g}: use --workers <= {int(cpus)} "
            "(Ray would otherwise wait forever)"
        )
    if workers * max(cpus_per_worker, 1) > cpus:
        raise SuperweightsError(
            f"{workers} workers x {cpus_per_worker} CPUs need {workers * cpus_per_worker} CPUs but the Ray cluster "
            f"has {cpus:g}: lower --cpus-per-worker (0 = share the free CPUs)"
        )
    if use_gpu and workers > gpus:
        raise SuperweightsError(f"{workers} GPU workers need {workers} GPUs but the Ray cluster has {gpus:g}")


def _resolve_run(storage: Path, name: str | None, method: str) -> tuple[str, Path, dict | None]:
    name = name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "/" in name or name in ("", ".", ".."):
        raise SuperweightsError(f"run name {name!r} must be a plain folder name")
    run_dir = storage / name
    record = None
    if (run_dir / RUN_FILE).is_file():
        record = json.loads((run_dir / RUN_FILE).read_text())
    return name, run_dir, record


def _check_same_config(run_dir: Path, config: Config) -> None:
    """Resuming continues the same training: only train.epochs may change (to train longer)."""
    last = latest_local_checkpoint(run_dir)
    if last is None or not (last / "config.json").is_file():
        return
    saved = {f"{s}.{k}": v for s, sec in json.loads((last / "config.json").read_text()).items() for k, v in sec.items()}
    now = config.flat()
    for key in sorted(set(saved) | set(now)):
        if key != "train.epochs" and saved.get(key) != now.get(key):
            raise SuperweightsError(
                f"run {run_dir.name!r} was trained with {key}={saved.get(key)!r}, not {now.get(key)!r}: resuming "
                "needs the same config (only train.epochs may change); pick another --name for a new run"
            )


def _worker_error(e: BaseException) -> str:
    failures = getattr(e, "worker_failures", None) or {}
    for rank, err in sorted(failures.items()):
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, SuperweightsError):
            return str(cause)
        text = " ".join(str(cause).split())
        return f"worker {rank}: {type(cause).__name__}: {text[:300]}"
    return " ".join(str(e).split())[:300]


def train(config: Config, options: RayOptions = RayOptions(), *, name: str | None = None,
          out: str | Path | None = None, tracking_uri: str | None = None, experiment: str = EXPERIMENT,
          device: str = "cpu", log: Callable[[str], None] = print, track: bool = True) -> TrainOutcome:
    from ensemble.data import absolute_paths, load_data
    from ensemble.methods import plan_summary
    from ensemble.model import member_labels

    began = time.perf_counter()
    options.validate()
    # Relative data paths mean this folder: Ray Train workers run in a folder of their own, and a resume with
    # another worker count must see the same config (`_check_same_config`).
    config = dataclasses.replace(config, data=absolute_paths(config.data))
    device = validate_device(device)  # `--device tpu` must not quietly train on the CPU
    if device != "cpu" and options.workers != 0:
        options = dataclasses.replace(options, use_gpu=device.startswith("cuda"))
    uri = check_tracking_uri(tracking_uri or default_tracking_uri()) if track else None
    if uri:
        fail_orphaned_runs(uri, log)  # runs whose driver was killed with -9 do not stay RUNNING
    address = _ray_address(options)
    check_ray_address(address)

    import ray

    for option, value in (("--storage-path", options.storage_path), ("--out", out)):
        if value is not None and "://" in str(value):  # Path() would turn s3://b/x into <cwd>/s3:/b/x silently
            raise SuperweightsError(f"{option} {value!r} is a URI: checkpoints and model files go to a local or "
                                    "NFS path (mounted on every node); cloud storage URIs are not supported yet")
    storage = Path(options.storage_path).expanduser().absolute()
    run_name, run_dir, record = _resolve_run(storage, name, config.bank.method)
    if record and uri and record.get("tracking_uri") != uri:
        raise SuperweightsError(
            f"run {run_name!r} was tracked in {record.get('tracking_uri')}: pass --tracking-uri "
            f"{record.get('tracking_uri')} to resume it"
        )
    if record:
        _check_same_config(run_dir, config)

    workers = options.workers
    connected = ray.is_initialized() or bool(address)
    if workers != 0 and not connected:  # a local Ray: check before starting anything
        workers = min(2, available_cpus()) if workers < 0 else workers
        if workers > available_cpus():
            raise SuperweightsError(
                f"{workers} workers need {workers} CPUs but this machine has {available_cpus()}: use --workers <= "
                f"{available_cpus()} (Ray would otherwise wait forever)"
            )

    started_ray = False
    run_id = None
    status = "FAILED"
    try:
        if workers != 0 and connected:  # an existing cluster: join it (starts nothing) and ask it
            started_ray = _init_ray(address, log)
            if workers < 0:
                workers = min(2, int(ray.cluster_resources().get("CPU", 1)))
            _cluster_check(workers, options.use_gpu, options.cpus_per_worker)
        t = config.train
        data = load_data(config.data, t.seed, t.batch_size, t.eval_batch_size)
        summary = plan_summary(config, data.info, before_training=True)
        flops = [m["flops"] for m in summary["members"]]
        layout = resolve_layout(workers, options.member_groups, options.data_replicas, flops, t.batch_size)
        if workers != 0 and not connected:
            started_ray = _init_ray(address, log)
            _cluster_check(workers, options.use_gpu, options.cpus_per_worker)
        labels = member_labels(list(config.ensemble.members))
        log(f"{len(labels)} members ({', '.join(labels)}) on {data.info.name}: {data.train.num_examples} train / "
            f"{data.val.num_examples} val / {data.test.num_examples} test images")
        log(f"method {config.bank.method}: {summary['total_params']:,} trainable parameters "
            f"({100 * summary['total_params'] / summary['full_ensemble_params']:.1f}% of the full ensemble's "
            f"{summary['full_ensemble_params']:,}); bank {summary['bank_params']:,}, "
            f"coefficients {summary['coefficient_params']:,}, private {summary['private_params']:,}")
        for line in _method_steps(config):
            log(line)
        groups = "; ".join(f"group {g}: {', '.join(labels[i] for i in ids)}" for g, ids in enumerate(layout.groups))
        where = "in this process" if workers == 0 else f"{workers} Ray worker{'s' if workers != 1 else ''}"
        log(f"parallelism: {where} = {layout.member_groups} member group(s) x {layout.data_replicas} data "
            f"replica(s) ({groups})")
        if uri:
            ratio = summary.get("budget_ratio", 1.0)
            tags = {"method": config.bank.method, "budget_ratio": f"{ratio:.6g}", "members": ",".join(labels),
                    "workers": workers, "member_groups": layout.member_groups, "data_replicas": layout.data_replicas}
            params = {**config.flat(), **plan_params(summary, labels)}
            run_id = start_run(uri, experiment=experiment, run_name=run_name, params=params, tags=tags,
                               resume_run_id=record.get("mlflow_run_id") if record else None)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not record:
            (run_dir / RUN_FILE).write_text(json.dumps(
                {"mlflow_run_id": run_id, "tracking_uri": uri, "experiment": experiment, "run_name": run_name}, indent=2))
        log(("resuming" if record else "run") + f" {run_name}: checkpoints in {run_dir}"
            + (f"; MLflow run {run_id}" if run_id else ""))
        spec = {
            "config": config.to_dict(), "layout": layout.to_dict(), "local": workers == 0, "run_dir": str(run_dir),
            "tracking_uri": uri, "run_id": run_id, "checkpoint_every": options.checkpoint_every,
            "crash_at_epoch": options.crash_at_epoch, "use_gpu": options.use_gpu, "device": device,
        }
        (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # a reason from an earlier attempt is not this one's
        # Ctrl-C: Ray Train's own SIGINT handler (installed by fit() in the main thread) aborts the controller and
        # then leaves through sys.exit, so the run would end FAILED with exit 1 and no word. Fitting in a helper
        # thread keeps ^C ours: KeyboardInterrupt here, the run KILLED, and ray.shutdown() below stops the
        # controller and its workers (they are owned by this driver). With a caller's own Ray session (we did
        # not connect) Ray's handler stays in charge. In-process (0 workers) the loop runs in this thread.
        result = _fit(spec, workers, options, run_name, storage, in_thread=started_ray and workers > 0)
        if (run_dir / DIVERGED_FILE).is_file():  # no model files: the run did not finish
            raise SuperweightsError((run_dir / DIVERGED_FILE).read_text().strip())
        ckpt = Path(result.checkpoint.path) if result.checkpoint is not None else latest_local_checkpoint(run_dir)
        if ckpt is None or not (ckpt / STATE_FILE).is_file():
            raise SuperweightsError(f"training ended without a final checkpoint in {run_dir}")
        metrics = json.loads((ckpt / "metrics.json").read_text())
        state = json.loads((ckpt / STATE_FILE).read_text())
        out_dir = None
        if out is not None:
            out_dir = Path(out).expanduser().absolute()
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in MODEL_FILES:
                if (ckpt / f).is_file():
                    shutil.copy2(ckpt / f, out_dir / f)
        status = "FINISHED"
        history = state["history"]
        metrics.pop("history", None)
        return TrainOutcome(run_name, run_dir, ckpt, out_dir, metrics, history, layout, workers, uri, run_id,
                            resumed=bool(record), seconds=time.perf_counter() - began,
                            extra={"resumes": state.get("resumes", [])})
    except KeyboardInterrupt:
        status = "KILLED"
        if run_id:
            set_failure_tag(uri, run_id, "interrupted (Ctrl-C or SIGTERM)")
        if started_ray:  # stop the workers first: a checkpoint they were still copying must not complete after
            ray.shutdown()  # the line below has named an older one as the newest
            started_ray = False
        raise KeyboardInterrupt(_interrupted_line(run_name, run_dir)) from None
    except SuperweightsError as e:  # the reason, next to the FAILED status (e.g. where training diverged)
        if run_id:
            set_failure_tag(uri, run_id, str(e))
        raise
    finally:
        if run_id:
            end_run(uri, run_id, status)
        if started_ray:
            ray.shutdown()


def _interrupted_line(run_name: str, run_dir: Path) -> str:
    last = latest_local_checkpoint(run_dir)
    if last is None:
        return f"run {run_name} stopped before its first checkpoint (MLflow run KILLED)"
    epoch = json.loads((last / STATE_FILE).read_text())["epoch"]
    return (f"run {run_name} stopped (MLflow run KILLED); its newest checkpoint is epoch {epoch} ({last}): "
            f"rerun with --name {run_name} to resume from there")


def _method_steps(config: Config) -> list[str]:
    """What the training loop will do besides training: users see the plan above change at these points."""
    b, g = config.bank, config.grouping
    lines = []
    if b.method == "superweights" and b.grouping == "gradient":
        lines.append(f"gradient grouping: {g.warmup_epochs} warm-up epoch(s) on the depth-bin groups above, then "
                     f"groups from slot-gradient similarity (threshold {g.threshold:g}), re-initialised, "
                     f"{config.train.epochs} epoch(s)")
    if b.method == "superweights" and b.unshare_epoch:
        lines.append(f"coefficient unsharing after training epoch {b.unshare_epoch} (threshold {b.unshare_threshold:g})")
    if b.method == "ssn" and b.ssn_groups == "learned":
        lines.append(f"learned SSN groups: {b.pretrain_steps} pre-training steps, then k-means into {b.groups} "
                     "groups (the numbers above are for depth groups at the same budget)")
    return lines


def worker_cpus(workers: int, cpus_per_worker: int) -> int:
    """CPUs each worker reserves (Ray then gives it that many OMP/torch threads). Default: the free CPUs shared
    evenly, so 1 worker on 2 CPUs trains with 2 threads, as in-process training does, not with 1."""
    if cpus_per_worker or workers == 0:
        return max(cpus_per_worker, 1)
    import ray

    return max(1, int(ray.available_resources().get("CPU", 1)) // workers)


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


def _fit(spec: dict, workers: int, options: RayOptions, run_name: str, storage: Path, in_thread: bool = False):
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

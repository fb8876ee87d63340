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

`ray.storage_path` and `out` are plain paths or URIs (s3://, gs://, file://, anything `pyarrow.fs` opens, as
Ray Train's storage does): Ray Train gets the storage URI as it is and moves a worker group's checkpoints
itself; this driver's own files there go through `ray_jobs.storage_uri`.

The settings come from the config's `[ray]` (and `[debug]`) sections (`ray_jobs.options.RayOptions` is their
view; command-line flags are written into the config before this point). Cluster plumbing lives in
`ray_jobs.ray_cluster`, the `TorchTrainer` call in `ray_jobs.ray_fit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import SuperweightsError
from ensemble.config import RUNTIME_SECTIONS, Config, from_dict
from ensemble.training import resolve_channels_last, validate_device

from .layout import Layout, available_cpus, resolve_layout
from .options import RayOptions
from .orphans import fail_orphaned_runs
from .ray_cluster import _cluster_check, _init_ray, check_ray_address  # noqa: F401  (_init_ray: bench/)
from .ray_fit import fit
from .storage_uri import Location, check_reachable, is_complete, location
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


@dataclass
class TrainOutcome:
    # Paths for plain paths; `storage_uri.Location`s (str() = the URI) where the storage or --out is a URI
    run_name: str
    run_dir: Path | Location
    checkpoint: Path | Location  # the final checkpoint folder in storage
    out_dir: Path | Location | None
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


def _resolve_run(storage: Location, name: str | None, method: str) -> tuple[str, Location, dict | None]:
    name = name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "/" in name or name in ("", ".", ".."):
        raise SuperweightsError(f"run name {name!r} must be a plain folder name")
    run_dir = storage / name
    record = None
    if (run_dir / RUN_FILE).is_file():
        record = (run_dir / RUN_FILE).read_json()
    return name, run_dir, record


# keys a resume may change: more epochs, and how the step runs (compiled or not, memory layout) or evaluates
# (its batch; runs from before the automatic batch hold 512), not what it computes
RESUMABLE_KEYS = ("train.epochs", "train.compile", "train.channels_last", "train.eval_batch_size")


def _check_same_config(run_dir: Path | Location, config: Config) -> None:
    """Resuming continues the same training: only train.epochs may change (to train longer), and the sections
    that say where it runs ([ray], [serve], [debug]: another worker count is fine), which a config.json written
    before those sections existed lacks."""
    last = latest_local_checkpoint(run_dir)
    if last is None or not (saved_file := location(last) / "config.json").is_file():
        return
    # read through the loader, so a key added since the run was saved counts as its default (an older run resumes)
    saved = from_dict(saved_file.read_json()).flat()
    now = config.flat()
    for key in sorted(set(saved) | set(now)):
        if key.split(".")[0] in RUNTIME_SECTIONS or key in RESUMABLE_KEYS:
            continue
        if saved.get(key) != now.get(key):
            raise SuperweightsError(
                f"run {location(run_dir).name!r} was trained with {key}={saved.get(key)!r}, not {now.get(key)!r}: resuming "
                "needs the same config (only train.epochs, train.compile, train.channels_last and train.eval_batch_size may change); "
                "pick another --name for a new run"
            )


def train(config: Config, options: RayOptions | None = None, *, name: str | None = None,
          out: str | Path | None = None, tracking_uri: str | None = None, experiment: str = EXPERIMENT,
          device: str = "cpu", log: Callable[[str], None] = print, track: bool = True) -> TrainOutcome:
    from ensemble.data import absolute_paths, load_data
    from ensemble.methods import plan_summary
    from ensemble.model import member_labels

    began = time.perf_counter()
    # One source of truth: explicit options (tests, benchmarks) are written into the config, which is then saved
    # with every checkpoint and logged to MLflow; the driver reads its view of it.
    if options is not None:
        config = options.into(config)
    # Relative data paths mean this folder: Ray Train workers run in a folder of their own, and a resume with
    # another worker count must see the same config (`_check_same_config`).
    config = dataclasses.replace(config, data=absolute_paths(config.data))
    device = validate_device(device)  # `--device tpu` must not quietly train on the CPU
    if device != "cpu" and config.ray.workers != 0:
        config = dataclasses.replace(config, ray=dataclasses.replace(config.ray, use_gpu=device.startswith("cuda")))
    options = RayOptions.from_config(config).validate()
    uri = check_tracking_uri(tracking_uri or default_tracking_uri()) if track else None
    if uri:
        fail_orphaned_runs(uri, log)  # runs whose driver was killed with -9 do not stay RUNNING
    address = _ray_address(options)
    check_ray_address(address)

    import ray

    # Paths or URIs, parsed (a malformed URI or an unknown scheme is one line) and asked once, before anything
    # starts: missing credentials or an unknown bucket must not surface as a traceback after the MLflow run began.
    storage = location(options.storage_path, "--storage-path")
    out_loc = location(out, "--out") if out is not None else None
    for option, loc in (("--storage-path", storage), ("--out", out_loc)):
        if loc is not None:
            check_reachable(loc, option)
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
        # where the workers evaluate (a Ray worker with `ray.use_gpu` runs on its GPU whatever --device says):
        # the automatic evaluation batch this prints is the one they use
        eval_device = "cuda" if workers != 0 and options.use_gpu else device
        data = load_data(config.data, t.seed, t.batch_size, t.eval_batch_size, eval_device)
        summary = plan_summary(config, data.info, before_training=True)
        flops = [m["flops"] for m in summary["members"]]
        layout = resolve_layout(workers, options.member_groups, options.data_replicas, flops, t.batch_size)
        if workers != 0 and not connected:
            started_ray = _init_ray(address, log)
            _cluster_check(workers, options.use_gpu, options.cpus_per_worker)
        labels = member_labels(list(config.ensemble.members))
        log(f"{len(labels)} members ({', '.join(labels)}) on {data.info.name}: {data.train.num_examples} train / "
            f"{data.val.num_examples} val / {data.test.num_examples} test images (evaluated {data.val.batch_size} at a "
            f"time{'' if t.eval_batch_size else ', train.eval_batch_size automatic'})")
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
        channels_last = resolve_channels_last(config, data.info)
        if not record:  # (a resumed bank keeps the order it was saved with)
            log("memory format: channels_last (conv members, batches and the bank's generated conv weights)"
                if channels_last else "memory format: row-major (train.channels_last = false)"
                if config.train.channels_last is False else "memory format: row-major (no convolutions)")
        if uri:
            ratio = summary.get("budget_ratio", 1.0)
            tags = {"method": config.bank.method, "budget_ratio": f"{ratio:.6g}", "members": ",".join(labels),
                    "workers": workers, "member_groups": layout.member_groups, "data_replicas": layout.data_replicas,
                    "channels_last": str(channels_last).lower()}
            params = {**config.flat(), **plan_params(summary, labels)}
            run_id = start_run(uri, experiment=experiment, run_name=run_name, params=params, tags=tags,
                               resume_run_id=record.get("mlflow_run_id") if record else None)
        run_dir.mkdir()
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
        (run_dir / DIVERGED_FILE).delete()  # a reason from an earlier attempt is not this one's
        # Ctrl-C: Ray Train's own SIGINT handler (installed by fit() in the main thread) aborts the controller and
        # then leaves through sys.exit, so the run would end FAILED with exit 1 and no word. Fitting in a helper
        # thread keeps ^C ours: KeyboardInterrupt here, the run KILLED, and ray.shutdown() below stops the
        # controller and its workers (they are owned by this driver). With a caller's own Ray session (we did
        # not connect) Ray's handler stays in charge. In-process (0 workers) the loop runs in this thread.
        result = fit(spec, workers, options, run_name, storage, in_thread=started_ray and workers > 0)
        if (run_dir / DIVERGED_FILE).is_file():  # no model files: the run did not finish
            raise SuperweightsError((run_dir / DIVERGED_FILE).read_text().strip())
        # Ray names the checkpoint by its path on the storage's filesystem (a URI's prefix stripped): it lies in
        # the run folder, which this driver names in the form the user gave (path or URI)
        ckpt = run_dir / posixpath.basename(result.checkpoint.path.rstrip("/")) if result.checkpoint is not None \
            else latest_local_checkpoint(run_dir)
        if ckpt is None or not is_complete(ckpt):
            raise SuperweightsError(f"training ended without a final checkpoint in {run_dir}")
        metrics = (ckpt / "metrics.json").read_json()
        state = (ckpt / STATE_FILE).read_json()
        if out_loc is not None:
            out_loc.mkdir()
            present = ckpt.sizes(MODEL_FILES)
            for f in MODEL_FILES:
                if present[f] is not None:
                    (ckpt / f).copy_to(out_loc / f)
        status = "FINISHED"
        history = state["history"]
        metrics.pop("history", None)
        return TrainOutcome(run_name, run_dir.native, ckpt.native, out_loc.native if out_loc else None, metrics,
                            history, layout, workers, uri, run_id,
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


def _interrupted_line(run_name: str, run_dir: Location) -> str:
    last = latest_local_checkpoint(run_dir)
    if last is None:
        return f"run {run_name} stopped before its first checkpoint (MLflow run KILLED)"
    epoch = (last / STATE_FILE).read_json()["epoch"]
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

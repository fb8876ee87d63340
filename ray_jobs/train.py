"""Job entrypoint: `python -m ray_jobs.train --config ... [--set k=v] [--workers N] [--tracking-uri URI]
[--address ADDR] [--out DIR]`; also what `superweights train` runs.

Valid as a Ray Jobs entrypoint (`ray job submit --address http://127.0.0.1:8265 --working-dir . --
python -m ray_jobs.train ...`): inside a job, Ray sets RAY_ADDRESS and the driver joins that cluster.
A job's working folder is a temporary copy that Ray may delete after the job, so a job must give absolute
--out, --storage-path and --tracking-uri (sqlite:////abs/path/mlflow.db or http://server; not needed with
--no-tracking): without them it stops before training, in one line (`durable.require_durable`).
"""

from __future__ import annotations

import argparse
import time

from ensemble.config import load_config
from ensemble.training import validate_device

from . import driver  # as a module: tests replace `driver.train`
from .durable import require_durable
from .exit_codes import end_process, interrupt_on_sigterm, run_guarded
from .formatting import format_metrics
from .options import RayOptions, with_ray_flags

_D = RayOptions()


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The train command's options (shared by `superweights train` and `python -m ray_jobs.train`)."""
    p.add_argument("--config", "-c", help="TOML config file (default: built-in digits defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key with a TOML value; repeatable")
    p.add_argument("--out", "-o",
                   help="copy the final model files here (default: runs/<run name>; an absolute path in a Ray job)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu); with workers, cuda = one GPU each")
    p.add_argument("--download", action="store_true", help="download CIFAR files if missing (needs a network)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    g = p.add_argument_group("Ray Train")
    g.add_argument("--workers", "-w", type=int,
                   help="Ray Train workers (default: min(2, CPUs)); 0 runs the same loop in this process")
    g.add_argument("--member-groups", type=int,
                   help="split the members over this many worker groups, balanced by FLOPs (default: derive)")
    g.add_argument("--data-replicas", type=int,
                   help="split every batch over this many workers per member group (default: derive)")
    g.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    g.add_argument("--cpus-per-worker", type=int,
                   help="CPUs (and torch threads) each worker reserves (default: the free CPUs shared evenly)")
    g.add_argument("--checkpoint-every", type=int, metavar="EPOCHS",
                   help=f"epochs between checkpoints (default: {_D.checkpoint_every}; the last epoch always)")
    g.add_argument("--max-failures", type=int,
                   help=f"restart a failed worker group from the last checkpoint this many times (default: {_D.max_failures})")
    g.add_argument("--address",
                   help="Ray cluster address (host:port or ray://host:10001; default: $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--storage-path",
                   help=f"checkpoint storage; a run lives in <storage-path>/<name> (default: {_D.storage_path}; in a "
                        "Ray job an absolute path every node can reach, e.g. on NFS)")
    g.add_argument("--name", help="run name; rerunning with an existing name resumes it (default: <method>-<time>)")
    g.add_argument("--crash-at-epoch", type=int, metavar="EPOCH",
                   help=argparse.SUPPRESS)  # debug.crash_at_epoch: fault-tolerance testing
    m = p.add_argument_group("MLflow")
    m.add_argument("--tracking-uri",
                   help="MLflow tracking URI or server URL (default: sqlite:///<cwd>/mlflow.db; in a Ray job "
                        "sqlite:////abs/path/mlflow.db or http(s)://server)")
    m.add_argument("--experiment", default="superweights", help="MLflow experiment (default: superweights)")
    m.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


_OPTION_ARGS = ("workers", "member_groups", "data_replicas", "use_gpu", "cpus_per_worker", "checkpoint_every",
                "max_failures", "address",
                "storage_path", "crash_at_epoch")  # argparse dest == RayOptions field


def config_with_flags(args, config):
    """The config with the Ray Train flags given on the command line written into its `[ray]` / `[debug]`
    sections: flag > --set > TOML > default."""
    return with_ray_flags(config, {k: getattr(args, k, None) for k in _OPTION_ARGS})


def options_from_args(args, config=None) -> RayOptions:
    """The driver's view of `config_with_flags(args, config)` (the defaults without a config)."""
    return RayOptions.from_config(config_with_flags(args, config if config is not None else load_config(None)))


def run_from_args(args, log=print) -> int:
    """Train, then print what a user wants: the test table, where things are, how to look at them."""
    # Syntax only, before anything starts: with workers the GPUs are theirs, and a device the driver does not
    # know (tpu, cuda:x) would otherwise fall back to CPU silently.
    device = validate_device(args.device)
    overrides = list(args.overrides)
    if args.download:
        overrides.append("data.download=true")
    config = config_with_flags(args, load_config(args.config, overrides))
    options = RayOptions.from_config(config)
    # In `ray job submit --working-dir .` the cwd is Ray's temporary copy: refuse outputs that would vanish
    # with it before anything is written. A storage path from the config counts as given.
    storage = options.storage_path
    if args.storage_path is None and storage == _D.storage_path:
        storage = None  # the default
    require_durable({"--out": args.out, "--storage-path": storage,
                     **({} if args.no_tracking else {"--tracking-uri": args.tracking_uri})})
    name = args.name or f"{config.bank.method}-{_stamp()}"
    outcome = driver.train(config, options, name=name, out=args.out or f"runs/{name}",
                           tracking_uri=args.tracking_uri, experiment=args.experiment, device=device, log=log,
                           track=not args.no_tracking)
    log("")
    log(format_metrics(outcome.metrics))
    log("")
    log(f"model files: {outcome.out_dir}")
    log(f"checkpoint:  {outcome.checkpoint}")
    if outcome.mlflow_run_id:
        log(f"MLflow run:  {outcome.mlflow_run_id} ({args.experiment}) in {outcome.tracking_uri}")
        if outcome.tracking_uri.startswith(("http://", "https://")):
            log(f"open the UI: {outcome.tracking_uri}")
        else:
            log(f"open the UI: mlflow ui --backend-store-uri {outcome.tracking_uri}  (then http://127.0.0.1:5000)")
    log(f"done in {outcome.seconds:.1f}s")
    return 0


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train",
                                     description="Train a SuperWeight ensemble with Ray Train (job entrypoint).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    interrupt_on_sigterm()  # `ray job stop` sends SIGTERM: the MLflow run ends KILLED, not RUNNING
    return run_guarded(lambda: run_from_args(args, log=lambda s: print(s, flush=True)))


def entry() -> None:
    """The process entry (console script / `python -m`): `main` returns its code to in-process callers."""
    end_process(main())


if __name__ == "__main__":
    entry()

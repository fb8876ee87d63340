"""`superweights` command line: plan, train, evaluate, compare, serve, models.

This file is the parser and the dispatch; each command's own options and work live with the command
(`ray_jobs.train`, `ray_jobs.serve`, `ray_jobs.compare`), the text tables in `ray_jobs.formatting`.
`ray` and `mlflow` are only imported by the commands that use them.

Every user mistake ends as one line on stderr (`superweights: error: ...`) and exit code 2; a
traceback means a bug in superweights, never in the user's input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anytime.evaluate import format_table, run_evaluation
from core.errors import SuperweightsError
from ensemble import members as _members  # noqa: F401  (registers every architecture for `models`)
from ensemble.checkpoint import load_plan, saved_channels_last
from ensemble.config import load_config
from ensemble.data import dataset_info
from ensemble.methods import plan_summary
from ensemble.registry import list_families, list_models
from ensemble.training import resolve_device, validate_device

from . import serve, train
from .compare import ChildResources, build_report, compare, format_markdown, write_report
from .durable import require_durable
from .exit_codes import end_process, interrupt_on_sigterm, run_guarded
from .formatting import format_plan
from .model_uri import is_mlflow_uri, resolved_model
from .storage_uri import is_uri
from .tracking import check_tracking_uri, default_tracking_uri

DESCRIPTION = """One shared SuperWeight bank generates the weights of several heterogeneous networks
(an ensemble) under an exact parameter budget. Configs are TOML files (see configs/); any key can be
overridden with --set section.key=value (TOML values: --set bank.budget=0.25,
--set 'ensemble.members=["wrn-28-7","wrn-28-4"]')."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config file (default: built-in digits defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key with a TOML value; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="superweights", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="print the bank layout and parameter counts (no data, no training)",
                       description="Lay out the bank for a config and print parameter counts, FLOPs per member "
                                   "and the groups/blocks/templates. Needs only the dataset's input shape.")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the machine-readable plan summary")
    p.add_argument("--from", dest="checkpoint", metavar="CHECKPOINT",
                   help="show the plan saved in a checkpoint folder (learned groups, coefficient sharing)")

    p = sub.add_parser("train", help="train an ensemble with Ray Train, track it in MLflow, write a checkpoint folder",
                       description="Train every member together (sum of cross-entropies on the same batch) on Ray "
                                   "Train workers (members split over worker groups by FLOPs, batches over data "
                                   "replicas), validate each epoch, test at the end, checkpoint to "
                                   "<storage-path>/<name> (rerun with the same --name to resume), log to MLflow, and "
                                   "copy weights.safetensors, plan.json, config.json and metrics.json to --out.")
    train.add_train_arguments(p)

    sub.add_parser("models", help="list the registered member architectures")

    p = sub.add_parser("compare", help="SuperWeight ensembles vs full-parameter baselines, on Ray, tracked in MLflow",
                       description="Train, under one parent MLflow run, the SuperWeight ensemble at every budget, the "
                                   "full ensemble, every member alone and the SSN variants, for every seed; reuse runs "
                                   "already FINISHED with the same settings; print and save the comparison table "
                                   "(CSV, Markdown) and plots. On digits the protocol keeps 20 training images per "
                                   "class (data.train_per_class=20) unless you set it. Every child is one run of the "
                                   "training loop in a Ray task of its own (--child-cpus, --child-gpus), at most "
                                   "--max-concurrent at once, on the Ray cluster at --address (default $RAY_ADDRESS, "
                                   "else a local Ray started and stopped here); this process alone writes to MLflow. "
                                   "On a cluster, submit it as a Ray job (`ray job submit --working-dir . -- python -m "
                                   "ray_jobs.cli compare ...`, absolute --tracking-uri and --out).")
    _add_config_args(p)
    p.add_argument("--budgets", default="0.1,0.25,0.5,0.83,1.0,2.0", help="budget ratios, comma separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--methods", default="superweights,full,members,ssn-repeat,ssn-mask,ssn-inter",
                   help="comma separated subset of superweights, full, members, ssn-repeat, ssn-mask, ssn-inter")
    p.add_argument("--experiment", default="superweights-compare", help="MLflow experiment name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", "-o", help="report folder (default ./compare)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from MLflow alone, no training")
    g = p.add_argument_group("Ray (one task per child)")
    g.add_argument("--child-cpus", type=int, default=1, metavar="N",
                   help="Ray CPUs per child, also its torch threads (default 1)")
    g.add_argument("--child-gpus", type=int, default=0, metavar="N", help="Ray GPUs per child (default 0)")
    g.add_argument("--max-concurrent", type=int, metavar="N",
                   help="children running at once (default: the cluster's free CPUs // --child-cpus, at least 1)")
    g.add_argument("--address", default="",
                   help="Ray cluster (host:port or ray://host:10001; default: $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--device", help="cpu, cuda or cuda:N for the children (default: cuda with --child-gpus >= 1, else cpu); "
                                    "cuda needs --child-gpus >= 1")

    p = sub.add_parser("evaluate", help="anytime evaluation of a checkpoint (accuracy vs FLOPs, subsets, exits)",
                       description="Evaluate a checkpoint folder along its anytime schedule: accuracy, NLL, ECE and "
                                   "disagreement vs cumulative FLOPs (fitted combiner and plain mean, calibrated and "
                                   "not), the budgeted-batch curve (per-input early exit: accuracy vs mean FLOPs), "
                                   "every member subset, every exit, and the normalised area under the accuracy-FLOPs "
                                   "curves. Writes anytime.csv, budgeted.csv, subsets.csv, exits.csv, anytime.png and "
                                   "summary.json to --out.")
    p.add_argument("checkpoint", help="checkpoint folder written by `superweights train`, the same folder on storage "
                                      "(s3://..., gs://..., file:///...) or an MLflow model (runs:/<id>, "
                                      "models:/<name>/<version>)")
    p.add_argument("--split", default="test", help="val or test (default: test)")
    p.add_argument("--out", "-o", help="output folder (default: CHECKPOINT/anytime-SPLIT for a folder, "
                                       "./anytime-SPLIT for a URI)")
    p.add_argument("--tracking-uri", help="MLflow store of a runs:/ or models:/ CHECKPOINT (default: "
                                          "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")

    p = sub.add_parser("serve", help="serve anytime predictions with budget cutoffs over HTTP (uvicorn or Ray Serve)",
                       description="Serve a checkpoint folder (local or s3://, gs://, file://) or an MLflow model (runs:/<id>, models:/<name>/<version>) "
                                   "over HTTP: POST /predict with a FLOPs budget or a deadline, GET /model, GET /health, "
                                   "OpenAPI docs at /docs. uvicorn by default; --ray deploys on Ray Serve. "
                                   "See the README, \"Serving anytime predictions\".")
    serve.add_serve_arguments(p)
    return parser


def _load(args):
    overrides = list(args.overrides)
    if getattr(args, "download", False):
        overrides.append("data.download=true")
    return load_config(args.config, overrides)


def cmd_plan(args) -> int:
    if args.checkpoint:
        config, info, plan = load_plan(args.checkpoint)  # checked against its config.json: one line if not
        summary = plan_summary(config, info, plan)
        channels_last = saved_channels_last(args.checkpoint)
        if channels_last is not None:
            summary["bank_channels_last"] = channels_last
    else:
        config = _load(args)
        # a budget that `train` would refuse for this machine's memory is refused here too
        summary = plan_summary(config, dataset_info(config.data), memory_check=True)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_plan(summary))
    return 0


def cmd_train(args) -> int:
    return train.run_from_args(args)


def cmd_models(args) -> int:
    print("\n".join(list_models()))
    print("families (any valid combination): " + ", ".join(list_families()))
    return 0


def cmd_evaluate(args) -> int:
    device = str(resolve_device(args.device))  # validate_device first: before the checkpoint is read
    if is_mlflow_uri(args.checkpoint) or is_uri(args.checkpoint):  # fetched into a temporary folder
        with resolved_model(args.checkpoint, args.tracking_uri) as folder:  # (the outputs: never in there)
            result, out = run_evaluation(folder, args.split, args.out or f"anytime-{args.split}", device)
    else:
        result, out = run_evaluation(args.checkpoint, args.split, args.out, device)
    print(format_table(result))
    print(f"\nwrote anytime.csv, budgeted.csv, subsets.csv, exits.csv, anytime.png, summary.json to {out}")
    return 0


def cmd_serve(args) -> int:
    return serve.run_from_args(args, log=lambda s: print(s, flush=True))


def cmd_compare(args) -> int:
    if args.device is not None:
        validate_device(args.device)  # before Ray or MLflow start; the children resolve it on their machines
    # A submitted job (`ray job submit --working-dir .`) runs in a temporary copy: nothing may land there.
    require_durable({"--out": args.out, "--tracking-uri": args.tracking_uri})
    out = Path(args.out or "compare")
    if args.report_only:
        uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
        report = build_report(uri, args.experiment)
        write_report(report, out)
    else:
        try:
            budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
        except ValueError:
            raise SuperweightsError(f"--budgets must be comma separated numbers, got {args.budgets!r}") from None
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        resources = ChildResources(cpus=args.child_cpus, gpus=args.child_gpus, max_concurrent=args.max_concurrent,
                                   device=args.device)
        report = compare(args.config, args.overrides, budgets, args.seeds, methods, args.experiment,
                         args.tracking_uri, out, log=lambda s: print(s, flush=True), resources=resources,
                         address=args.address)
    print(format_markdown(report))
    print(f"\nreport: {out.absolute()} (comparison.csv, comparison.md, accuracy_vs_params.png, anytime_overlay.png)")
    return 0


COMMANDS = {"plan": cmd_plan, "train": cmd_train, "models": cmd_models, "evaluate": cmd_evaluate, "serve": cmd_serve,
            "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "compare"):  # serve has its own graceful shutdown (uvicorn / Ray Serve)
        interrupt_on_sigterm()  # `ray job stop`: the runs (and in-flight compare children) end KILLED
    return run_guarded(lambda: COMMANDS[args.command](args))


def entry() -> None:
    """The process entry (console script / `python -m`): `main` returns its code to in-process callers."""
    end_process(main())


if __name__ == "__main__":
    entry()

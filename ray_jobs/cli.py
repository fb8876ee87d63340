"""`superweights` command line: plan, train, models.

Every user mistake ends as one line on stderr (`superweights: error: ...`) and exit code 2; a
traceback means a bug in superweights, never in the user's input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from core.errors import SuperweightsError

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

    p = sub.add_parser("train", help="train an ensemble and write a checkpoint folder",
                       description="Train every member together (sum of cross-entropies on the same batch), "
                                   "validate each epoch, test at the end, and write weights.safetensors, "
                                   "plan.json, config.json and metrics.json to --out.")
    _add_config_args(p)
    p.add_argument("--out", "-o", help="checkpoint folder (default: runs/<method>-<time>)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--download", action="store_true", help="download CIFAR files if missing (needs a network)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    sub.add_parser("models", help="list the registered member architectures")
    return parser


def _load(args):
    from ensemble.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "download", False):
        overrides.append("data.download=true")
    return load_config(args.config, overrides)


def cmd_plan(args) -> int:
    from ensemble.data import dataset_info
    from ensemble.planning import plan_summary

    config = _load(args)
    summary = plan_summary(config, dataset_info(config.data))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_plan(summary))
    return 0


def format_plan(s: dict) -> str:
    lines = [f"dataset {s['dataset']} {tuple(s['input_shape'])}, {s['num_classes']} classes; method {s['method']}", ""]
    lines.append(f"{'member':<16}{'params':>14}{'MFLOPs/image':>16}")
    for m in s["members"]:
        lines.append(f"{m['name']:<16}{m['params']:>14,}{m['flops'] / 1e6:>16.2f}")
    full = s["full_ensemble_params"]
    lines += [
        "",
        f"{'budget (bank parameters)':<34}{s['budget']:>14,}",
        f"{'bank_params':<34}{s['bank_params']:>14,}",
        f"{'coefficient_params':<34}{s['coefficient_params']:>14,}",
        f"{'private_params (norms, biases)':<34}{s['private_params']:>14,}",
        f"{'total_params':<34}{s['total_params']:>14,}  ({100 * s['total_params'] / full:.1f}% of full)",
        f"{'full_ensemble_params':<34}{full:>14,}",
    ]
    if s["groups"]:
        lines += ["", f"{'group':>5}  {'kind':<10}{'slots':>6}{'blocks':>7}{'templates':>10}{'params':>12}"]
        for g in s["groups"]:
            lines.append(
                f"{g['id']:>5}  {g['kind']:<10}{len(g['slots']):>6}{len(g['blocks']):>7}"
                f"{sum(b['templates'] for b in g['blocks']):>10}{sum(b['params'] for b in g['blocks']):>12,}"
            )
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    lines = [f"{'':<18}{'test acc':>10}{'NLL':>9}"]
    for name, m in metrics["members"].items():
        lines.append(f"{name:<18}{m['accuracy']:>10.4f}{m['nll']:>9.4f}")
    e = metrics["ensemble"]
    lines.append(f"{'ensemble (mean)':<18}{e['accuracy']:>10.4f}{e['nll']:>9.4f}   "
                 f"ECE {e['ece']:.4f}  disagreement {e['disagreement']:.4f}")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from ensemble.data import load_data
    from ensemble.planning import plan_summary
    from ensemble.training import fit

    config = _load(args)
    t = config.train
    data = load_data(config.data, t.seed, t.batch_size, t.eval_batch_size)
    summary = plan_summary(config, data.info)
    print(f"{len(config.ensemble.members)} members ({', '.join(config.ensemble.members)}) on {data.info.name}: "
          f"{data.train.num_examples} train / {data.val.num_examples} val / {data.test.num_examples} test images")
    print(f"method {config.bank.method}: {summary['total_params']:,} trainable parameters "
          f"({100 * summary['total_params'] / summary['full_ensemble_params']:.1f}% of the full ensemble's "
          f"{summary['full_ensemble_params']:,}); bank {summary['bank_params']:,}, "
          f"coefficients {summary['coefficient_params']:,}, private {summary['private_params']:,}")
    out = args.out or f"runs/{config.bank.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = fit(config, out, args.device, progress=not args.quiet and sys.stderr.isatty(), data=data)
    print()
    print(format_metrics(result.metrics))
    print(f"\ncheckpoint: {result.out_dir}")
    return 0


def cmd_models(args) -> int:
    from ensemble import members as _members  # noqa: F401
    from ensemble.registry import list_families, list_models

    print("\n".join(list_models()))
    print("families (any valid combination): " + ", ".join(list_families()))
    return 0


COMMANDS = {"plan": cmd_plan, "train": cmd_train, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SuperweightsError as e:
        print(f"superweights: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("superweights: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

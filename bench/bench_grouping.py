"""Issue 4/12 measurement: depth vs gradient grouping and coefficient unsharing on digits, through the
product's own door: every variant is a `superweights compare` launch (`ray_jobs.compare.compare`, children as
Ray tasks, 1 CPU each, concurrently), so the numbers are those users get.

Default members (configs/digits.toml). compare's digits protocol applies (20 training images per class: with
the full split every method scores ~99%). Budgets 0.25 and 0.5: depth-bin groups vs gradient-based groups;
at 0.5 also coefficient unsharing after training epoch 5. Accuracy/disagreement are mean +- std over seeds,
read back from MLflow; "groups" and "slot pairs unshared" are the MLflow metrics the training loop logs at
the epoch the step happened. The MLflow store (default runs/bench-grouping.db) keeps finished children, so a
rerun reuses them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, write_section  # noqa: E402
from ray_jobs.compare import KIND_TAG, compare  # noqa: E402

VARIANTS = {  # name: (budget, overrides)
    "depth, budget 0.25": (0.25, []),
    "gradient, budget 0.25": (0.25, ["bank.grouping=gradient"]),
    "depth, budget 0.5": (0.5, []),
    "gradient, budget 0.5": (0.5, ["bank.grouping=gradient"]),
    "depth + unsharing (epoch 5), budget 0.5": (0.5, ["bank.unshare_epoch=5"]),
}


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def child_metrics(uri: str, experiment: str) -> list[dict]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              filter_string=f"tags.`{KIND_TAG}` = 'compare-child' and attributes.status = 'FINISHED'")
    return [r.data.metrics for r in runs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    p.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'runs' / 'bench-grouping.db'}")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--section", default="grouping-20pc", help="BENCHMARKS.md section to write")
    args = p.parse_args(argv)
    (ROOT / "runs").mkdir(exist_ok=True)
    rows = []
    for i, (name, (budget, extra)) in enumerate(VARIANTS.items()):
        experiment = f"bench-grouping-{i}"
        report = compare(str(ROOT / "configs" / "digits.toml"), [*extra, *args.overrides], [budget], args.seeds,
                         ["superweights"], experiment, args.tracking_uri, ROOT / "runs" / "bench-grouping" / str(i),
                         log=print)
        row = report["rows"][0]
        ms = child_metrics(args.tracking_uri, experiment)
        dis = [m["test_disagreement"] for m in ms]
        groups = [m.get("groups", float("nan")) for m in ms]
        pairs = [m.get("unshared_pairs", 0.0) for m in ms]
        rows.append(f"| {name} | {row['accuracy_mean']:.4f} +- {row['accuracy_std']:.4f} | "
                    f"{statistics.mean(dis):.4f} +- {sd(dis):.4f} | "
                    f"{f'{statistics.mean(groups):.1f}' if 'bank.grouping=gradient' in extra else 'depth bins'} | "
                    f"{statistics.mean(pairs):.1f} |")
        print(rows[-1], flush=True)
    command = " ".join(["python bench/bench_grouping.py", *(argv if argv is not None else sys.argv[1:])])
    body = f"""## Results: depth vs gradient grouping, coefficient unsharing (digits, {args.seeds} seeds, through `superweights compare`)

Command: `{command}` (configs/digits.toml members, 15 training epochs (+ 2 warm-up epochs for gradient
grouping), compare's digits protocol data.train_per_class=20, test split; mean +- std over seeds
`train.seed=0..{args.seeds - 1}`; grouping.threshold 0.05; each variant one `compare` launch, children as
concurrent 1-CPU Ray tasks; extra overrides: {', '.join(args.overrides) or 'none'}).

| variant | ensemble accuracy | member disagreement | groups | slot pairs unshared |
|---|---|---|---|---|
""" + "\n".join(rows)
    print(body)
    if not args.no_write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()

"""Issue 4 measurement: depth vs gradient grouping and coefficient unsharing on digits (3 seeds).

Default members (configs/digits.toml), full digits split. For budgets 0.25 and 0.5: ensemble test
accuracy with depth-bin groups vs gradient-based groups; at 0.5: member disagreement with and without
coefficient unsharing (after epoch 5). Numbers are reported as they come out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_section  # noqa: E402
from ensemble.config import load_config  # noqa: E402
from ensemble.loop import fit  # noqa: E402

VARIANTS = {
    "depth, budget 0.25": ["bank.budget=0.25"],
    "gradient, budget 0.25": ["bank.budget=0.25", "bank.grouping=gradient"],
    "depth, budget 0.5": ["bank.budget=0.5"],
    "gradient, budget 0.5": ["bank.budget=0.5", "bank.grouping=gradient"],
    "depth + unsharing (epoch 5), budget 0.5": ["bank.budget=0.5", "bank.unshare_epoch=5"],
}


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    p.add_argument("--section", default="grouping", help="BENCHMARKS.md section to write (one per protocol)")
    args = p.parse_args(argv)
    rows = []
    for name, extra in VARIANTS.items():
        acc, dis, groups, pairs = [], [], [], []
        for seed in range(args.seeds):
            config = load_config(Path(__file__).resolve().parents[1] / "configs/digits.toml",
                                 [*extra, *args.overrides, f"train.seed={seed}"])
            r = fit(config, None, progress=False, log=lambda s: None)
            acc.append(r.metrics["ensemble"]["accuracy"])
            dis.append(r.metrics["ensemble"]["disagreement"])
            groups.append(len(r.model.plan.groups))
            pairs.append(sum(h.get("unshared_pairs", 0) for h in r.history))
            print(f"{name} seed {seed}: acc {acc[-1]:.4f} disagreement {dis[-1]:.4f} groups {groups[-1]} "
                  f"unshared pairs {pairs[-1]}", flush=True)
        rows.append(f"| {name} | {statistics.mean(acc):.4f} +- {sd(acc):.4f} | {statistics.mean(dis):.4f} +- {sd(dis):.4f} "
                    f"| {statistics.mean(groups):.1f} | {statistics.mean(pairs):.1f} |")
    command = " ".join(["python bench/bench_grouping.py", *(argv if argv is not None else sys.argv[1:])])
    split = ", ".join(args.overrides) if args.overrides else "full digits split"
    body = f"""## Results: depth vs gradient grouping, coefficient unsharing (digits, {args.seeds} seeds, {split})

Command: `{command}` (configs/digits.toml members, 15 epochs, test split; mean +- std over seeds
`train.seed=0..{args.seeds - 1}`; grouping.threshold 0.05; extra overrides: {split}).

| variant | ensemble accuracy | member disagreement | groups | slot pairs unshared |
|---|---|---|---|---|
""" + "\n".join(rows)
    print(body)
    if args.write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()

"""Issues 6/7 measurement: `superweights compare` on digits, its table and plots written to BENCHMARKS.md.

Runs the comparison through the same code as the CLI (children already FINISHED in the MLflow store are
reused, so a rerun only rebuilds the report), then writes the Markdown table, a line per bank method saying
at which budgets its mean accuracy reaches the full ensemble's, and copies the two PNGs to
bench/results/<section>/ so BENCHMARKS.md can show them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_section  # noqa: E402
from ray_jobs.compare import compare, format_markdown  # noqa: E402
from ray_jobs.compare_plan import METHODS  # noqa: E402


def versus_full(rows: list[dict]) -> list[str]:
    """Per bank method: the budgets whose mean accuracy is >= the full ensemble's, with % of its parameters."""
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None:
        return []
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows if r["budget"] != ""):
        rs = [r for r in rows if r["method"] == method]
        wins = [r for r in rs if r["accuracy_mean"] >= full["accuracy_mean"]]
        clear = [r for r in wins if r["accuracy_mean"] - r["accuracy_std"] > full["accuracy_mean"] + full["accuracy_std"]]
        text = ", ".join(f"{r['budget']} ({r['pct_of_full']:.1f}% of its parameters, {r['accuracy_mean']:.4f})"
                         for r in wins) or "no budget"
        lines.append(f"* {method}: mean accuracy >= the full ensemble's ({full['accuracy_mean']:.4f} +- "
                     f"{full['accuracy_std']:.4f}) at {text}; beyond one std of both: "
                     f"{', '.join(str(r['budget']) for r in clear) or 'none'}.")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/digits.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    p.add_argument("--budgets", default="0.1,0.25,0.5,0.83,1.0,2.0")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--experiment", default="digits-compare")
    p.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'runs' / 'compare.db'}")
    p.add_argument("--section", default="compare", help="BENCHMARKS.md section (and bench/results/ folder)")
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md and bench/results/")
    args = p.parse_args(argv)
    out = ROOT / "runs" / f"bench-{args.section}"
    out.parent.mkdir(parents=True, exist_ok=True)
    budgets = [float(b) for b in args.budgets.split(",")]
    report = compare(args.config, args.overrides, budgets, args.seeds, args.methods.split(","), args.experiment,
                     args.tracking_uri, out)
    command = " ".join(["python bench/bench_compare.py", *(argv if argv is not None else sys.argv[1:])])
    settings = ", ".join(args.overrides) or "the digits protocol's defaults"
    body = "\n".join([
        f"## Results: superweights compare on digits ({args.section})",
        "",
        f"Command: `{command}` (configs/digits.toml members and exits, data.train_per_class=20, tested on the "
        f"rest; {settings}; {args.seeds} seeds; the report is rebuilt from MLflow alone).",
        "",
        format_markdown(report),
        "",
        *versus_full(report["rows"]),
        "",
        f"![accuracy vs parameters](bench/results/{args.section}/accuracy_vs_params.png)",
        f"![anytime curves](bench/results/{args.section}/anytime_overlay.png)",
    ])
    print(body)
    if args.write:
        results = ROOT / "bench" / "results" / args.section
        results.mkdir(parents=True, exist_ok=True)
        for name in ("accuracy_vs_params.png", "anytime_overlay.png", "comparison.csv"):
            shutil.copy(out / name, results / name)
        write_section(args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

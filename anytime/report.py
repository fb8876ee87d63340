"""The evaluator's files and console table (`anytime.evaluate` computes them): anytime.csv, budgeted.csv,
subsets.csv, exits.csv, anytime.png (the fixed-prefix and budgeted-batch curves on one axis) and summary.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

TABLES = ("anytime", "budgeted", "subsets", "exits")
FILES = tuple(f"{t}.csv" for t in TABLES) + ("anytime.png", "summary.json")
BUDGETED_COLUMNS = ["threshold", "val_mean_flops", "mean_flops", "fraction_of_full", "mean_steps", "accuracy",
                    "nll", "ece"]


def _write_csv(path: Path, rows: list[dict], empty_header: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else empty_header)
        writer.writeheader()
        writer.writerows(rows)


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    s, summary = result["anytime"], result["summary"]
    xs = [0] + [r["cumulative_flops"] / 1e6 for r in s]
    fitted = summary["combiner"] != "plain"
    ys = [0] + [r["accuracy"] for r in s]
    label = "fixed prefix, fitted combiner" if fitted else "fixed prefix (anytime schedule)"
    ax.step(xs, ys, where="post", color="C0", label=f"{label} (AUC {summary['auc']:.3f})")
    ax.plot(xs[1:], ys[1:], "o", color="C0", ms=4)
    if fitted:
        ax.step(xs, [0] + [r["accuracy_plain"] for r in s], where="post", color="C7", ls="--",
                label=f"fixed prefix, plain mean (before fitting; AUC {summary['plain']['auc']:.3f})")
    if result["budgeted"]:
        bb = result["budgeted"]
        ax.plot([r["mean_flops"] / 1e6 for r in bb], [r["accuracy"] for r in bb], ".-", color="C2", lw=1.6, ms=3,
                label=f"budgeted batch: per-input early exit (AUC {summary['budgeted']['auc']:.3f})")
    sub = result["subsets"]
    ax.scatter([r["flops"] / 1e6 for r in sub], [r["accuracy"] for r in sub], marker="x", color="C3",
               label="member subsets (full members)", zorder=3)
    ax.set_xlabel("MFLOPs per image (cumulative; the budgeted batch: mean over images)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lo = min([r["accuracy"] for r in s] + [r["accuracy_plain"] for r in s])
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(r["accuracy"] for r in s) + 0.03) + 0.005)  # where the curves differ
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        _write_csv(out / f"{name}.csv", result[name], BUDGETED_COLUMNS if name == "budgeted" else [])
    plot(result, out / "anytime.png", title)
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2) + "\n")


def _f(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(result: dict) -> str:
    lines = [f"{'step':>4}  {'member':<16}{'exit':>5}{'cum MFLOPs':>12}{'acc':>8}{'NLL':>8}{'ECE':>8}{'disagr':>8}"
             f"{'acc plain':>11}"]
    for r in result["anytime"]:
        lines.append(f"{r['step']:>4}  {r['member']:<16}{r['exit']:>5}{r['cumulative_flops'] / 1e6:>12.3f}"
                     f"{r['accuracy']:>8.4f}{r['nll']:>8.4f}{r['ece']:>8.4f}{r['disagreement']:>8.4f}"
                     f"{r['accuracy_plain']:>11.4f}")
    s, p, u = result["summary"], result["summary"]["plain"], result["summary"]["uncalibrated"]
    lines += ["", f"{len(result['subsets'])} member subsets; best "
              + max(result["subsets"], key=lambda r: r["accuracy"])["subset"],
              f"final accuracy {s['final_accuracy']:.4f}  AUC {s['auc']:.4f}  NLL {s['nll']:.4f}  ECE {s['ece']:.4f}"
              f"  (combiner: {s['combiner']})",
              f"plain mean (before fitting): final accuracy {p['final_accuracy']:.4f}  AUC {p['auc']:.4f}  NLL "
              f"{p['nll']:.4f}  ECE {p['ece']:.4f}",
              f"calibration (final prefix): NLL {u['nll']:.4f} -> {s['nll']:.4f}  ECE {u['ece']:.4f} -> {s['ece']:.4f}"]
    b = s["budgeted"]
    if b:
        lines.append(f"budgeted batch ({b['score']} early exit, {b['levels']} fitted levels): AUC {b['auc']:.4f}")
    lines.append("at % of full FLOPs   fixed prefix acc   budgeted batch acc (mean MFLOPs)")
    for f, r in s["at_fraction"].items():
        mean = None if r["budgeted_mean_flops"] is None else r["budgeted_mean_flops"] / 1e6
        lines.append(f"{float(f) * 100:>17.0f}%   {_f(r['fixed_accuracy']):>16}   {_f(r['budgeted_accuracy']):>18} "
                     f"({_f(mean, '.3f')})")
    return "\n".join(lines)

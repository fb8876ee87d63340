"""The comparison report from MLflow alone: the latest FINISHED child run per settings, grouped by table label
and budget, means and spreads over seeds; Markdown, CSV, JSON and plots (`write_report`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from core.errors import SuperweightsError

from .compare_plan import variant_name
from .compare_plots import plot_accuracy_vs_params, plot_anytime_panels

KIND_TAG = "superweights.kind"
SETTINGS_TAG = "superweights.settings"
VARIANT_TAG = "superweights.variant"


def _finished_runs(uri: str, experiment: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'compare-child' "
                              "and attributes.status = 'FINISHED'", output_format="pandas")


def build_report(uri: str, experiment: str, settings: dict[str, str] | None = None) -> dict:
    """The comparison table and curves from MLflow alone (the latest FINISHED run per settings).

    `settings`: only these runs (settings hash -> table label, the launch's current names; a run reused
    from an older launch may carry another variant tag for the same model); None = every run, by its tag."""
    runs = _finished_runs(uri, experiment)
    if runs is None or runs.empty:
        raise SuperweightsError(f"no finished comparison runs in MLflow experiment {experiment!r} at {uri}")
    runs = runs.sort_values("start_time")
    latest = {}
    for _, r in runs.iterrows():
        if settings is None or r[f"tags.{SETTINGS_TAG}"] in settings:
            latest[r[f"tags.{SETTINGS_TAG}"]] = r
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    groups: dict[tuple, list] = {}
    for r in latest.values():
        budget = r["tags.budget_ratio"]
        label = settings[r[f"tags.{SETTINGS_TAG}"]] if settings is not None else _label_of(r)
        groups.setdefault((label, float(budget) if budget else None), []).append(r)
    full_params = [float(r["metrics.total_params"]) for (v, _), rs in groups.items() if v == "full" for r in rs]
    reference = full_params[0] if full_params else None
    rows, curves = [], []
    for (variant, budget), rs in sorted(groups.items(), key=lambda kv: _row_key(*kv[0])):
        def stat(key, rs=rs):
            values = [float(r[f"metrics.{key}"]) for r in rs]
            return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        acc, acc_sd = stat("test_accuracy")
        params = float(rs[0]["metrics.total_params"])
        rows.append({
            "method": variant, "budget": "" if budget is None else budget, "seeds": len(rs),
            "total_params": int(params), "pct_of_full": round(100 * params / reference, 2) if reference else "",
            "accuracy_mean": round(acc, 4), "accuracy_std": round(acc_sd, 4),
            "nll": round(stat("test_nll")[0], 4), "ece": round(stat("test_ece")[0], 4),
            "auc": round(stat("test_auc")[0], 4),
            **{f"{k}_calibrated": _mean_of(rs, f"test_{k}_calibrated") for k in ("nll", "ece")},
            # weaker members or less diverse ones? (issue 17: read next to the ensemble's accuracy)
            "member_accuracy": round(statistics.mean(_mean_member_accuracy(r) for r in rs), 4),
            "disagreement": round(stat("test_disagreement")[0], 4),
        })
        first = min(rs, key=lambda r: int(r["tags.seed"]))
        acc_hist = client.get_metric_history(first["run_id"], "anytime_accuracy")
        flop_hist = client.get_metric_history(first["run_id"], "anytime_flops")
        curves.append({"variant": variant, "budget": budget,
                       "flops": [m.value for m in sorted(flop_hist, key=lambda m: m.step)],
                       "accuracy": [m.value for m in sorted(acc_hist, key=lambda m: m.step)]})
    return {"rows": rows, "curves": curves, "reference_params": reference}


def _mean_of(runs, key: str):
    """The mean of metric `key` over the runs that logged it (rounded), "" when none did (older runs)."""
    values = [float(r[f"metrics.{key}"]) for r in runs if f"metrics.{key}" in r and r[f"metrics.{key}"] == r[f"metrics.{key}"]]
    return round(statistics.mean(values), 4) if values else ""


def _mean_member_accuracy(run) -> float:
    """The mean test accuracy of one run's members, each alone (its `test_accuracy.<member>` metrics; the
    search's frame has every member column of the experiment, NaN where a run has no such member)."""
    values = [float(v) for k, v in run.items() if k.startswith("metrics.test_accuracy.") and v == v]
    return statistics.mean(values) if values else float("nan")


def _label_of(run) -> str:
    """A run's table label from its logged config: runs logged before labels named the learning steps carry
    a bare "superweights" or "ssn-*" tag whatever steps they trained with."""
    tag = run[f"tags.{VARIANT_TAG}"]
    if not _banked(tag):
        return tag

    def param(key, default):
        value = run.get(f"params.{key}")
        return default if value is None or value != value else value  # absent or NaN (pandas) -> default

    return variant_name(tag.split(",")[0], param("bank.grouping", "depth"), int(param("bank.unshare_epoch", 0)),
                        param("bank.ssn_groups", "depth"))


def _row_key(variant: str, budget: float | None) -> tuple:
    # bank methods by label then budget (a method's rows with and without its learning steps stay apart);
    # full-parameter rows in the order they were planned (a stable sort)
    return _order(variant), variant if _banked(variant) else "", budget or 0.0


def _banked(variant: str) -> bool:
    return variant.startswith(("superweights", "ssn"))


def _order(variant: str) -> int:
    return 0 if variant.startswith("superweights") else 1 if variant.startswith("ssn") else 2 if variant == "full" else 3


COLUMNS = ["method", "budget", "seeds", "total_params", "pct_of_full", "accuracy_mean", "accuracy_std",
           "member_accuracy", "disagreement", "nll", "ece", "nll_calibrated", "ece_calibrated", "auc"]


def _cell(value) -> str:
    return "" if value == "" else f"{value:.4f}"  # "" = runs logged before the metric existed


def format_markdown(report: dict) -> str:
    # calibrated = after the temperature fitted on validation (issue 15): next to the raw figure it belongs to
    lines = ["| method | budget | seeds | total params | % of full | ensemble accuracy | mean member accuracy "
             "| disagreement | NLL | NLL calibrated | ECE | ECE calibrated | anytime AUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        pct = f"{r['pct_of_full']:.1f}%" if r["pct_of_full"] != "" else ""
        lines.append(f"| {r['method']} | {r['budget']} | {r['seeds']} | {r['total_params']:,} | {pct} | "
                     f"{r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | {r['member_accuracy']:.4f} | "
                     f"{r['disagreement']:.4f} | {r['nll']:.4f} | {_cell(r['nll_calibrated'])} | {r['ece']:.4f} | "
                     f"{_cell(r['ece_calibrated'])} | {r['auc']:.4f} |")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> list[Path]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(report["rows"])
    (out / "comparison.md").write_text(format_markdown(report) + "\n")
    (out / "comparison.json").write_text(json.dumps(report["rows"], indent=2) + "\n")

    plot_accuracy_vs_params(report, out / "accuracy_vs_params.png")
    plot_anytime_panels(report, out / "anytime_overlay.png")
    return [out / n for n in ("comparison.csv", "comparison.md", "comparison.json", "accuracy_vs_params.png",
                              "anytime_overlay.png")]

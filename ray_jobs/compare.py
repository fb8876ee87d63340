"""`superweights compare`: SuperWeight ensembles vs full-parameter baselines, tracked in MLflow.

Under one parent MLflow run, each (method, budget, seed) trains as a child run: the SuperWeight ensemble
at every budget, the `full` ensemble, every member alone as an ordinary network, and the SSN variants.
A child whose exact settings (the whole config, hashed) already have a FINISHED run in the experiment is
reused, so an interrupted comparison resumes where it stopped. The report is always rebuilt from MLflow
(`mlflow.search_runs`), which is why `--report-only` gives the same table as the launch.

Children train in-process one after another: on 2 cores one run at a time is the fastest; on a cluster,
submit `superweights compare` itself as a Ray job.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import SuperweightsError
from ensemble.config import Config, load_config

from .compare_plots import plot_accuracy_vs_params, plot_anytime_panels
from .tracking import RunLogger, check_tracking_uri, default_tracking_uri, end_run, plan_params, start_run

KIND_TAG = "superweights.kind"
SETTINGS_TAG = "superweights.settings"
VARIANT_TAG = "superweights.variant"
METHODS = ("superweights", "full", "members", "ssn-repeat", "ssn-mask", "ssn-inter")
DIGITS_PROTOCOL = ["data.train_per_class=20"]  # with the full split every method scores ~98%


@dataclass(frozen=True)
class Child:
    variant: str  # table label, e.g. "superweights", "full", "member wrn-10-2", "ssn-mask"
    budget: float | None  # budget ratio for bank methods, None for full-parameter ones
    seed: int
    config: Config

    @property
    def settings(self) -> str:
        return hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def plan_children(base_path: str | None, overrides: list[str], budgets: list[float], seeds: int,
                  methods: list[str]) -> list[Child]:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SuperweightsError(f"unknown --methods {unknown[0]!r}; valid: {', '.join(METHODS)}")
    if seeds < 1:
        raise SuperweightsError(f"--seeds must be >= 1, got {seeds}")
    base = load_config(base_path, overrides)
    protocol = DIGITS_PROTOCOL if base.data.name == "digits" and base.data.train_per_class == 0 else []
    ssn = [m for m in methods if m.startswith("ssn-")]
    # Per budget, the SSN variants to train: where the plan upsamples no slot (every group holds at least
    # each of its slots, budget ~0.5 and up on the digits members) repeat, mask and inter are one model,
    # trained once as "ssn-wavg" instead of three times under three names.
    ssn_variants = {b: _ssn_variants(load_config(base_path, [*protocol, *overrides, "bank.method=ssn",
                                                            f"bank.budget={float(b)}"]), ssn) for b in budgets}
    children = []
    for seed in range(seeds):
        def make(variant, budget, extra, seed=seed):
            children.append(Child(variant, budget, seed, load_config(base_path, [*protocol, *overrides, *extra,
                                                                                   f"train.seed={seed}"])))
        for b in budgets:
            if "superweights" in methods:
                make("superweights", b, ["bank.method=superweights", f"bank.budget={float(b)}"])
            for m in ssn_variants[b]:
                upsample = "repeat" if m == WAVG_ONLY else m[4:]  # any upsampler: none is used
                make(m, b, ["bank.method=ssn", f"bank.upsample={upsample}", f"bank.budget={float(b)}"])
        if "full" in methods:
            make("full", None, ["bank.method=full"])
        if "members" in methods:
            for name in base.ensemble.members:
                make(f"member {name}", None, ["bank.method=full", f'ensemble.members=["{name}"]'])
    return children


WAVG_ONLY = "ssn-wavg"


def _ssn_variants(config: Config, asked: list[str]) -> list[str]:
    """The asked SSN variants, or ["ssn-wavg"] when more than one was asked and the plan upsamples no slot.
    Learned groups are only known after pre-training, so they always keep every variant."""
    if len(asked) < 2 or config.bank.ssn_groups == "learned":
        return asked
    from ensemble.data import dataset_info
    from ensemble.planning import plan_summary

    return [WAVG_ONLY] if plan_summary(config, dataset_info(config.data))["upsampled_slots"] == 0 else asked


def _finished_runs(uri: str, experiment: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'compare-child' "
                              "and attributes.status = 'FINISHED'", output_format="pandas")


def run_child(child: Child, uri: str, experiment: str, parent_id: str) -> dict:
    """Train, evaluate along the anytime schedule, log everything; returns the run id and test accuracy."""
    from anytime.evaluate import run_evaluation
    from ensemble.data import load_data
    from ensemble.planning import plan_summary
    from ensemble.training import fit

    c = child.config
    data = load_data(c.data, c.train.seed, c.train.batch_size, c.train.eval_batch_size)
    summary = plan_summary(c, data.info)
    tags = {KIND_TAG: "compare-child", SETTINGS_TAG: child.settings, VARIANT_TAG: child.variant,
            "mlflow.parentRunId": parent_id, "method": c.bank.method, "seed": child.seed,
            "budget_ratio": "" if child.budget is None else child.budget, "members": ",".join(c.ensemble.members)}
    params = {**c.flat(), **plan_params(summary, list(c.ensemble.members))}
    run_id = start_run(uri, experiment=experiment, run_name=f"{child.variant} b={child.budget} s={child.seed}",
                       params=params, tags=tags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = fit(c, Path(tmp) / "ckpt", progress=False, log=lambda s: None, data=data)
            evaluation, out = run_evaluation(result.out_dir, "test", Path(tmp) / "eval")
            logger = RunLogger(uri, run_id)
            for row in result.history:
                logger.log_epoch(row["epoch"], row)
            logger.log_final(result.metrics, c.train.epochs)
            s = evaluation["summary"]
            metrics = {"total_params": summary["total_params"], "full_ensemble_params": summary["full_ensemble_params"],
                       "test_auc": s["auc"]}
            for k, v in metrics.items():
                logger.client.log_metric(run_id, k, float(v))
            for i, r in enumerate(evaluation["anytime"]):  # the curve, readable back from MLflow alone
                logger.client.log_metric(run_id, "anytime_accuracy", float(r["accuracy"]), step=i)
                logger.client.log_metric(run_id, "anytime_flops", float(r["cumulative_flops"]), step=i)
            logger.log_artifacts(result.out_dir, ("metrics.json", "plan.json", "config.json"))
            logger.log_artifacts(out, ("anytime.csv", "subsets.csv", "summary.json", "anytime.png"), "anytime")
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    end_run(uri, run_id, "FINISHED")
    return {"run_id": run_id, "accuracy": result.metrics["ensemble"]["accuracy"]}


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
        label = settings[r[f"tags.{SETTINGS_TAG}"]] if settings is not None else r[f"tags.{VARIANT_TAG}"]
        groups.setdefault((label, float(budget) if budget else None), []).append(r)
    full_params = [float(r["metrics.total_params"]) for (v, _), rs in groups.items() if v == "full" for r in rs]
    reference = full_params[0] if full_params else None
    rows, curves = [], []
    for (variant, budget), rs in sorted(groups.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1] or 0.0)):
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
        })
        first = min(rs, key=lambda r: int(r["tags.seed"]))
        acc_hist = client.get_metric_history(first["run_id"], "anytime_accuracy")
        flop_hist = client.get_metric_history(first["run_id"], "anytime_flops")
        curves.append({"variant": variant, "budget": budget,
                       "flops": [m.value for m in sorted(flop_hist, key=lambda m: m.step)],
                       "accuracy": [m.value for m in sorted(acc_hist, key=lambda m: m.step)]})
    return {"rows": rows, "curves": curves, "reference_params": reference}


def _order(variant: str) -> int:
    return 0 if variant == "superweights" else 1 if variant.startswith("ssn") else 2 if variant == "full" else 3


COLUMNS = ["method", "budget", "seeds", "total_params", "pct_of_full", "accuracy_mean", "accuracy_std", "nll", "ece", "auc"]


def format_markdown(report: dict) -> str:
    lines = ["| method | budget | seeds | total params | % of full | ensemble accuracy | NLL | ECE | anytime AUC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        pct = f"{r['pct_of_full']:.1f}%" if r["pct_of_full"] != "" else ""
        lines.append(f"| {r['method']} | {r['budget']} | {r['seeds']} | {r['total_params']:,} | {pct} | "
                     f"{r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['auc']:.4f} |")
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


def compare(config_path: str | None, overrides: list[str], budgets: list[float], seeds: int, methods: list[str],
            experiment: str, uri: str | None, out: Path, log: Callable[[str], None] = print) -> dict:
    uri = check_tracking_uri(uri or default_tracking_uri())
    children = plan_children(config_path, overrides, budgets, seeds, methods)
    finished = _finished_runs(uri, experiment)
    done = set() if finished is None or finished.empty else set(finished[f"tags.{SETTINGS_TAG}"])
    parent = start_run(uri, experiment=experiment, run_name="compare", params={
        "budgets": ",".join(map(str, budgets)), "seeds": seeds, "methods": ",".join(methods)},
        tags={KIND_TAG: "compare-parent"})
    try:
        for i, child in enumerate(children, 1):
            label = f"[{i}/{len(children)}] {child.variant}" + ("" if child.budget is None else f" budget {child.budget}")
            if child.settings in done:
                log(f"{label} seed {child.seed}: reused a finished run")
                continue
            start = time.perf_counter()
            finished_child = run_child(child, uri, experiment, parent)
            done.add(child.settings)
            log(f"{label} seed {child.seed}: done, test accuracy {finished_child['accuracy']:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
        report = build_report(uri, experiment, {c.settings: c.variant for c in children})
        files = write_report(report, out)
        logger = RunLogger(uri, parent)
        for f in files:
            logger.client.log_artifact(parent, str(f), "report")
    except BaseException:
        end_run(uri, parent, "FAILED")
        raise
    end_run(uri, parent, "FINISHED")
    return report

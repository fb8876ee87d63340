"""One child of `superweights compare`, at both ends of its Ray task.

In the task (wherever Ray placed it): `train_child` runs the product's training loop and the anytime
evaluation and returns plain data, files as bytes (`_in_task` sets its torch threads). In the driver, the
only MLflow writer: `start_child_run` opens the child's run when it is launched, `log_child` logs what the
task returned."""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ensemble.loop import total_epochs

from .compare_plan import Child
from .compare_report import KIND_TAG, SETTINGS_TAG, VARIANT_TAG
from .tracking import RunLogger, plan_params, start_run

CHECKPOINT_FILES = ("metrics.json", "plan.json", "config.json")  # logged under checkpoint/
ANYTIME_FILES = ("anytime.csv", "subsets.csv", "summary.json", "anytime.png")  # logged under anytime/


def _child_tags(child: Child, parent_id: str) -> dict:
    c = child.config
    return {KIND_TAG: "compare-child", SETTINGS_TAG: child.settings, VARIANT_TAG: child.variant,
            "mlflow.parentRunId": parent_id, "method": c.bank.method, "seed": child.seed,
            "budget_ratio": "" if child.budget is None else child.budget, "members": ",".join(c.ensemble.members)}


def _child_name(child: Child) -> str:
    return f"{child.variant} b={child.budget} s={child.seed}"


def start_child_run(child: Child, summary: dict, uri: str, experiment: str, parent_id: str) -> str:
    """The child's MLflow run (RUNNING), with the tags and params it always had; returns its id."""
    c = child.config
    params = {**c.flat(), **plan_params(summary, list(c.ensemble.members))}
    return start_run(uri, experiment=experiment, run_name=_child_name(child), params=params,
                     tags=_child_tags(child, parent_id))


def train_child(payload: dict) -> dict:
    """One child, where Ray placed it: the product's training loop, then the anytime evaluation on the test
    split. Returns plain data only (history, metrics, evaluation rows, files as bytes), so it works from
    any node; the caller logs it. `payload`: {"config": Config.to_dict(), "name": str, "device": str}."""
    from anytime.evaluate import run_evaluation
    from ensemble.config import from_dict

    from .driver import RayOptions, train

    began = time.perf_counter()
    config = from_dict(payload["config"])
    device = payload.get("device", "cpu")
    with tempfile.TemporaryDirectory(prefix="sw-compare-") as tmp:
        tmp = Path(tmp)
        outcome = train(config, RayOptions(workers=0, storage_path=str(tmp / "ray")), name=payload["name"],
                        out=tmp / "ckpt", track=False, log=lambda s: None, device=device)
        evaluation, out = run_evaluation(outcome.out_dir, "test", tmp / "eval", device)
        files = {"checkpoint": {n: (outcome.out_dir / n).read_bytes() for n in CHECKPOINT_FILES
                                if (outcome.out_dir / n).is_file()},
                 "anytime": {n: (out / n).read_bytes() for n in ANYTIME_FILES if (out / n).is_file()}}
    return {"metrics": outcome.metrics, "history": outcome.history, "summary": evaluation["summary"],
            "anytime": evaluation["anytime"], "files": files, "seconds": time.perf_counter() - began}


def _in_task(fn: Callable[[dict], dict], payload: dict, threads: int) -> dict:
    """The body of a child's Ray task: `threads` torch threads (a worker process is reused across tasks, and
    the numbers must not depend on how many children share the machine); the training loop's per-epoch
    lines go nowhere (the driver prints one line per finished child)."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(payload)


def log_child(uri: str, run_id: str, child: Child, summary: dict, result: dict) -> None:
    """Everything a finished child's task returned, into its run (this process is the only writer)."""
    logger = RunLogger(uri, run_id)
    for row in result["history"]:
        logger.log_epoch(row["epoch"], row)
    logger.log_final(result["metrics"], total_epochs(child.config))
    metrics = {"total_params": summary["total_params"], "full_ensemble_params": summary["full_ensemble_params"],
               "test_auc": result["summary"]["auc"],
               # issue 15: the anytime record's calibrated combiner (test_nll/test_ece: the plain mean, uncalibrated)
               **{f"test_{k}_calibrated": result["summary"][k] for k in ("nll", "ece") if k in result["summary"]}}
    for k, v in metrics.items():
        logger.client.log_metric(run_id, k, float(v))
    for i, r in enumerate(result["anytime"]):  # the curve, readable back from MLflow alone
        logger.client.log_metric(run_id, "anytime_accuracy", float(r["accuracy"]), step=i)
        logger.client.log_metric(run_id, "anytime_flops", float(r["cumulative_flops"]), step=i)
    with tempfile.TemporaryDirectory(prefix="sw-compare-log-") as tmp:
        for artifact_path, files in (("checkpoint", result["files"]["checkpoint"]),
                                     ("anytime", result["files"]["anytime"])):
            folder = Path(tmp) / artifact_path
            folder.mkdir()
            for name, data in files.items():
                (folder / name).write_bytes(data)
            logger.log_artifacts(folder, tuple(files), artifact_path)

"""MLflow tracking: one run per training run, created by the driver, written to by rank 0 only.

* The driver creates (or, on resume, re-opens) the run and logs what is known before training: the
  flattened config as params, the plan summary (parameter counts, FLOPs per member) and the tags
  `method`, `budget_ratio`, `members`. It ends the run: FINISHED, or FAILED on any error (KILLED on ^C),
  never left RUNNING by an exception.
* Rank 0 logs per-epoch metrics with `step=epoch` (idempotent: a step already logged, e.g. by an attempt
  that crashed after logging it, is skipped), final test metrics and the checkpoint files as artifacts.
  Models are never logged with mlflow.pytorch (pickle / torch.export): safetensors + JSON artifacts only.

Default store: `sqlite:////<abs cwd>/mlflow.db` with artifacts in `<abs cwd>/mlartifacts` (absolute,
because Ray workers do not share the driver's working directory).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from core.errors import SuperweightsError

from .driver_process import driver_tags

EXPERIMENT = "superweights"
METHOD_STEP_KEYS = ("groups", "grouping_threshold", "unshared_pairs", "coefficient_sets", "coefficient_params")
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_accuracy", "val_nll", "epoch_seconds")


def default_tracking_uri(folder: str | Path | None = None) -> str:
    return "sqlite:///" + str(Path(folder or os.getcwd()).absolute() / "mlflow.db")


def _metric_key(text: str) -> str:
    """MLflow keys allow alphanumerics, `_ - . / ` and spaces; member labels may hold '#'."""
    return re.sub(r"[^\w\-./ ]", "_", text)


def check_tracking_uri(uri: str, timeout: float = 3.0) -> str:
    """Normalise and check a tracking URI without waiting on MLflow's retry loop; one-line errors."""
    uri = uri.strip()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path.startswith("/"):
            raise SuperweightsError(
                f"tracking URI {uri!r} must name an absolute SQLite path (sqlite:////abs/path/mlflow.db): "
                "Ray workers do not share the driver's working directory"
            )
        parent = Path(path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SuperweightsError(f"cannot create the folder {parent} for tracking URI {uri!r}: {e.strerror}") from None
        return uri
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if not host:
            raise SuperweightsError(f"tracking URI {uri!r} has no host")
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise SuperweightsError(
                f"MLflow tracking server {uri} is not reachable ({reason}); start it (mlflow server --host "
                f"{host} --port {port}) or omit --tracking-uri to use a local SQLite file"
            ) from None
        return uri
    if parsed.scheme in ("", "file"):
        raise SuperweightsError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 has deprecated: use "
            "sqlite:////abs/path/mlflow.db or an http(s):// tracking server"
        )
    return uri  # databricks, postgresql, ...: let MLflow judge


def _artifact_location(uri: str) -> str | None:
    """Next to a SQLite DB; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()
    return None


def client_for(uri: str):
    from mlflow import MlflowClient

    quiet_store_setup()
    return MlflowClient(tracking_uri=uri)


def quiet_store_setup() -> None:
    """MLflow announces creating and migrating a new SQLite store at INFO ("Creating initial MLflow database
    tables...", "Updating database tables"): two timestamped lines in the middle of a user's first run that say
    nothing they need. Its warnings and errors still show."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def start_run(uri: str, *, experiment: str, run_name: str, params: dict, tags: dict,
              resume_run_id: str | None = None) -> str:
    """Create the run (or re-open `resume_run_id`, status back to RUNNING); returns the run id."""
    from mlflow.entities import Param, RunTag

    client = client_for(uri)
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except Exception as e:  # mlflow.exceptions.MlflowException and transport errors
            raise SuperweightsError(f"cannot re-open MLflow run {resume_run_id} in {uri}: {_one_line(e)}") from None
        client.update_run(resume_run_id, status="RUNNING")
        client.log_batch(resume_run_id, tags=[RunTag(k, v) for k, v in driver_tags().items()])  # the new driver
        return run.info.run_id
    try:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=_artifact_location(uri))
    except Exception as e:
        raise SuperweightsError(f"cannot use MLflow tracking URI {uri}: {_one_line(e)}") from None
    run = client.create_run(exp_id, run_name=run_name, tags={str(k): str(v) for k, v in tags.items()})
    run_id = run.info.run_id
    items = [Param(str(k), str(v)) for k, v in params.items()]
    for i in range(0, len(items), 90):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=items[i:i + 90])
    client.log_batch(run_id, tags=[RunTag("superweights.run_name", run_name)]
                     + [RunTag(k, v) for k, v in driver_tags().items()])  # see ray_jobs/orphans.py
    return run_id


def end_run(uri: str, run_id: str, status: str) -> None:
    """FINISHED / FAILED / KILLED; never raises (it runs while another error is being reported)."""
    try:
        client_for(uri).set_terminated(run_id, status=status)
    except Exception:  # pragma: no cover - the store is gone; nothing better to do
        pass


FAILURE_TAG = "superweights.failure"


def set_failure_tag(uri: str, run_id: str, reason: str) -> None:
    """Why a run FAILED, as a tag; never raises (it runs while the error is being reported)."""
    try:
        client_for(uri).set_tag(run_id, FAILURE_TAG, reason[:5000])
    except Exception:  # pragma: no cover - the store is gone; nothing better to do
        pass


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] if text else type(e).__name__


def plan_params(summary: dict, labels: list[str]) -> dict:
    """Plan summary as `plan.*` params: parameter counts and, per member, its parameters and FLOPs/image."""
    out = {f"plan.{k}": summary[k] for k in ("budget", "bank_params", "coefficient_params", "private_params",
                                             "total_params", "full_ensemble_params", "upsampled_slots") if k in summary}
    for label, m in zip(labels, summary["members"]):
        out[f"plan.flops.{_metric_key(label)}"] = m["flops"]
        out[f"plan.params.{_metric_key(label)}"] = m["params"]
    return out


class RunLogger:
    """Rank 0's handle on the run: idempotent epoch metrics, final metrics, artifacts."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = client_for(uri)
        self.logged_epochs = {m.step for m in self.client.get_metric_history(run_id, "train_loss")}
        self.final_steps = {m.step for m in self.client.get_metric_history(run_id, "test_accuracy")}

    def log_epoch(self, epoch: int, row: dict) -> bool:
        """Metrics of `epoch` (1-based, the step); False when that epoch was already logged."""
        from mlflow.entities import Metric

        if epoch in self.logged_epochs:
            return False
        now = int(time.time() * 1000)
        names = {"seconds": "epoch_seconds"}
        metrics = [Metric(names.get(k, k), float(row[k]), now, epoch)
                   for k in ("train_loss", "train_accuracy", "val_accuracy", "val_nll", "seconds", "train_seconds")
                   if k in row]
        # The method's learning steps, at the epoch they happened (the params hold the initial plan).
        metrics += [Metric(k, float(row[k]), now, epoch) for k in METHOD_STEP_KEYS if k in row]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.logged_epochs.add(epoch)
        return True

    def log_final(self, metrics: dict, step: int) -> bool:
        from mlflow.entities import Metric

        if step in self.final_steps:  # (a longer rerun of a finished run logs its new final step)
            return False
        now = int(time.time() * 1000)
        e = metrics["ensemble"]
        rows = [Metric(f"test_{k}", float(v), now, step) for k, v in e.items()]
        for name, m in metrics["members"].items():
            rows += [Metric(f"test_{k}.{_metric_key(name)}", float(v), now, step) for k, v in m.items()]
        self.client.log_batch(self.run_id, metrics=rows)
        self.final_steps.add(step)
        return True

    def log_artifacts(self, folder: str | Path, names: tuple[str, ...], artifact_path: str = "checkpoint") -> None:
        for n in names:
            p = Path(folder) / n
            if p.is_file():
                self.client.log_artifact(self.run_id, str(p), artifact_path)

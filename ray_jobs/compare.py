"""`superweights compare`: SuperWeight ensembles vs full-parameter baselines, tracked in MLflow.

Under one parent MLflow run, each (method, budget, seed) trains as a child run: the SuperWeight ensemble
at every budget, the `full` ensemble, every member alone as an ordinary network, and the SSN variants.
A child whose exact settings (the whole config, hashed) already have a FINISHED run in the experiment is
reused, so an interrupted comparison resumes where it stopped. The report is always rebuilt from MLflow
(`mlflow.search_runs`), which is why `--report-only` gives the same table as the launch.

Every child is one run of the product's training loop (`ray_jobs.driver.train` with `workers=0`: Ray
Train V2 local mode) plus its anytime evaluation, inside a Ray task of its own with `child_cpus` CPUs
(torch uses that many threads, so a child's numbers do not depend on how many run at once) and
`child_gpus` GPUs; at most `max_concurrent` run at once (default: as many as the cluster's free CPUs
allow). Ray: `address`, else `$RAY_ADDRESS` (what `ray job submit` sets), else a local Ray started like
`superweights train` starts one (and stopped at the end).

This process is the only MLflow writer (concurrent SQLite writers lock each other out): it creates a
child's run when the child is launched (RUNNING), and when the task returns it logs the epochs, the test
and anytime metrics and the files, which travel back from the task as bytes (the child may have run on
another node), then ends the run FINISHED. A failed child ends FAILED, the children still in flight are
cancelled (KILLED), the parent ends FAILED and the error is one line naming the child; ^C (or SIGTERM,
`ray job stop`) ends the in-flight children and the parent KILLED. Finished children stay reusable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import SuperweightsError
from ensemble.config import Config, load_config
from ensemble.data import absolute_paths
from ensemble.loop import total_epochs
from ensemble.training import validate_device

from .compare_report import (  # noqa: F401  (COLUMNS, format_markdown: moved there, re-exported here)
    COLUMNS,
    KIND_TAG,
    SETTINGS_TAG,
    VARIANT_TAG,
    _finished_runs,
    build_report,
    format_markdown,
    write_report,
)
from .orphans import fail_orphaned_runs
from .tracking import RunLogger, check_tracking_uri, default_tracking_uri, end_run, plan_params, start_run

CHECKPOINT_FILES = ("metrics.json", "plan.json", "config.json")  # logged under checkpoint/
ANYTIME_FILES = ("anytime.csv", "subsets.csv", "summary.json", "anytime.png")  # logged under anytime/

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
        # [serve] says nothing about training, and leaving it out keeps the hashes of runs logged before it existed
        settings = {k: v for k, v in self.config.to_dict().items() if k != "serve"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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
    ssn_variants = {b: _ssn_variants(load_config(base_path, [*protocol, *overrides, *NOT_SUPERWEIGHTS,
                                                            "bank.method=ssn", f"bank.budget={float(b)}"]), ssn)
                    for b in budgets}
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
                make(m, b, [*NOT_SUPERWEIGHTS, "bank.method=ssn", f"bank.upsample={upsample}", f"bank.budget={float(b)}"])
        if "full" in methods:
            make("full", None, [*NOT_SUPERWEIGHTS, "bank.method=full"])
        if "members" in methods:
            for name in base.ensemble.members:
                make(f"member {name}", None, [*NOT_SUPERWEIGHTS, "bank.method=full", f'ensemble.members=["{name}"]'])
    return children


WAVG_ONLY = "ssn-wavg"
# The SuperWeight method's learning steps (`--set bank.grouping=gradient`, `bank.unshare_epoch=N`) apply to the
# superweights children; the other methods' configs refuse them, so their children reset them (the defaults:
# the same settings hash as a child planned without them).
NOT_SUPERWEIGHTS = ("bank.grouping=depth", "bank.unshare_epoch=0")


def _ssn_variants(config: Config, asked: list[str]) -> list[str]:
    """The asked SSN variants, or ["ssn-wavg"] when more than one was asked and the plan upsamples no slot.
    Learned groups are only known after pre-training, so they always keep every variant."""
    if len(asked) < 2 or config.bank.ssn_groups == "learned":
        return asked
    from ensemble.data import dataset_info
    from ensemble.methods import plan_summary

    return [WAVG_ONLY] if plan_summary(config, dataset_info(config.data))["upsampled_slots"] == 0 else asked


@dataclass(frozen=True)
class ChildResources:
    """What each child task asks Ray for, and how many run at once."""

    cpus: int = 1  # Ray CPUs per child = torch threads in the child
    gpus: int = 0  # Ray GPUs per child
    max_concurrent: int | None = None  # None: floor(free CPUs / cpus), at least 1, at most the children to run
    device: str | None = None  # cpu / cuda for the children; None: cuda when gpus >= 1, else cpu

    def validate(self) -> ChildResources:
        if self.cpus < 1:
            raise SuperweightsError(f"--child-cpus must be >= 1, got {self.cpus}")
        if self.gpus < 0:
            raise SuperweightsError(f"--child-gpus must be >= 0, got {self.gpus}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise SuperweightsError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        device = validate_device(self.child_device)
        if device.startswith("cuda") and self.gpus < 1:
            raise SuperweightsError(f"--device {device} needs a GPU per child: add --child-gpus 1")
        return self

    @property
    def child_device(self) -> str:
        return self.device or ("cuda" if self.gpus >= 1 else "cpu")


def _child_tags(child: Child, parent_id: str) -> dict:
    c = child.config
    return {KIND_TAG: "compare-child", SETTINGS_TAG: child.settings, VARIANT_TAG: child.variant,
            "mlflow.parentRunId": parent_id, "method": c.bank.method, "seed": child.seed,
            "budget_ratio": "" if child.budget is None else child.budget, "members": ",".join(c.ensemble.members)}


def _child_name(child: Child) -> str:
    return f"{child.variant} b={child.budget} s={child.seed}"


def child_plan(child: Child) -> dict:
    """The child's plan summary; needs the dataset's shape only, not its files (those are the task's business)."""
    from ensemble.data import dataset_info
    from ensemble.methods import plan_summary

    return plan_summary(child.config, dataset_info(child.config.data), before_training=True)


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


def _task_error(e: BaseException) -> str:
    """One line for a child's failure: a SuperweightsError as it is, anything else as `Type: message`."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, SuperweightsError):
        return " ".join(str(cause).split())
    text = " ".join(str(cause).split())[:300]
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def _connect_ray(address: str, log: Callable[[str], None]) -> bool:
    """Join `address` ($RAY_ADDRESS when empty), else start a local Ray as `superweights train` does;
    True when this call started/connected it (and must shut it down)."""
    import os

    from .ray_cluster import _init_ray, check_ray_address

    address = address or os.environ.get("RAY_ADDRESS", "")
    check_ray_address(address)
    return _init_ray(address, log)


def _check_cluster(res: ChildResources) -> None:
    """A child asking for more than any node has would wait forever: refuse in one line."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    if res.cpus > cpus:
        raise SuperweightsError(f"--child-cpus {res.cpus} is more than any node of the Ray cluster has "
                                f"(largest: {cpus:g} CPUs); use --child-cpus <= {int(cpus)}")
    if res.gpus > gpus:
        raise SuperweightsError(f"--child-gpus {res.gpus} is more than any node of the Ray cluster has "
                                f"(largest: {gpus:g} GPUs)")


def _concurrency(res: ChildResources, to_run: int) -> int:
    if res.max_concurrent is not None:
        return min(res.max_concurrent, max(1, to_run))
    import ray

    free = ray.available_resources()
    n = math.floor(free.get("CPU", 0) / res.cpus)
    if res.gpus:
        n = min(n, math.floor(free.get("GPU", 0) / res.gpus))
    return max(1, min(n, to_run))


def _run_children(pending: list[tuple[int, Child, dict]], total: int, uri: str, experiment: str, parent: str,
                  res: ChildResources, concurrent: int, task: Callable[[dict], dict],
                  log: Callable[[str], None]) -> None:
    """Launch the children as Ray tasks, at most `concurrent` at once; log each one as it finishes."""
    import ray

    remote = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=0)(_in_task)
    queue = list(pending)
    in_flight: dict = {}  # ObjectRef -> (index, child, run id, plan summary)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < concurrent:
                i, child, summary = queue.pop(0)
                run_id = start_child_run(child, summary, uri, experiment, parent)
                # A relative data.root means the user's current directory, not the task's (the settings hash
                # keeps the config as given).
                config = dataclasses.replace(child.config, data=absolute_paths(child.config.data))
                payload = {"config": config.to_dict(), "device": res.child_device,
                           "name": _child_name(child).replace(" ", "_").replace("/", "_")}
                ref = remote.options(name=f"compare {_child_name(child)}").remote(task, payload, res.cpus)
                in_flight[ref] = (i, child, run_id, summary)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)  # a timeout: ^C stays responsive
            if not ready:
                continue
            i, child, run_id, summary = in_flight.pop(ready[0])
            label = _label(i, total, child)
            try:
                result = ray.get(ready[0])
            except Exception as e:  # the task raised, or its worker/node died
                end_run(uri, run_id, "FAILED")
                raise SuperweightsError(
                    f"child {label} seed {child.seed} failed: {_task_error(e)} (finished children are kept: rerun "
                    "the same command to resume)") from None
            try:
                log_child(uri, run_id, child, summary, result)
            except BaseException:
                end_run(uri, run_id, "FAILED")
                raise
            end_run(uri, run_id, "FINISHED")
            log(f"{label} seed {child.seed}: done, test accuracy {result['metrics']['ensemble']['accuracy']:.4f} "
                f"({result['seconds']:.0f} s)")
    except BaseException:
        _cancel(list(in_flight))
        for _, _, run_id, _ in in_flight.values():
            end_run(uri, run_id, "KILLED")
        raise


def _cancel(refs: list, grace_s: float = 10.0) -> None:
    """Cancel in-flight children: KeyboardInterrupt in each task (its temporary folder is removed), then
    force (kill the worker) for any that did not stop within `grace_s`; their errors are collected here so
    Ray does not print them as unhandled."""
    if not refs:
        return
    import ray

    try:
        for ref in refs:
            ray.cancel(ref)
        _, left = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        for ref in left:
            ray.cancel(ref, force=True)
        for ref in refs:
            try:
                ray.get(ref, timeout=grace_s)
            except Exception:
                pass
    except Exception:  # pragma: no cover - Ray already gone (its shutdown ends the tasks anyway)
        pass


def _label(i: int, total: int, child: Child) -> str:
    return f"[{i}/{total}] {child.variant}" + ("" if child.budget is None else f" budget {child.budget}")


def compare(config_path: str | None, overrides: list[str], budgets: list[float], seeds: int, methods: list[str],
            experiment: str, uri: str | None, out: Path, log: Callable[[str], None] = print, *,
            resources: ChildResources = ChildResources(), address: str = "",
            task: Callable[[dict], dict] = train_child) -> dict:
    """Train the children not yet FINISHED as Ray tasks, then build, write and log the report.

    `task` is what each Ray task runs (default `train_child`); tests swap it to inject failures."""
    resources.validate()
    uri = check_tracking_uri(uri or default_tracking_uri())
    fail_orphaned_runs(uri, log)  # an earlier comparison's driver killed with -9 left its runs RUNNING
    children = plan_children(config_path, overrides, budgets, seeds, methods)
    finished = _finished_runs(uri, experiment)
    done = set() if finished is None or finished.empty else set(finished[f"tags.{SETTINGS_TAG}"])
    pending, launching = [], set()
    for i, child in enumerate(children, 1):
        if child.settings in done or child.settings in launching:
            log(f"{_label(i, len(children), child)} seed {child.seed}: reused a finished run")
        else:
            pending.append((i, child, child_plan(child)))  # a plan that cannot fit fails here, not mid-run
            launching.add(child.settings)
    started_ray = False
    parent = None
    status = "FAILED"
    try:
        if pending:  # Ray only when there is something to train (a finished comparison rebuilds its report)
            started_ray = _connect_ray(address, log)
            _check_cluster(resources)
            concurrent = _concurrency(resources, len(pending))
            log(f"training {len(pending)} of {len(children)} children on Ray, up to {concurrent} at once "
                f"({resources.cpus} CPU{'s' if resources.cpus != 1 else ''}"
                + (f", {resources.gpus} GPU{'s' if resources.gpus != 1 else ''}" if resources.gpus else "")
                + f" each, device {resources.child_device})")
        parent = start_run(uri, experiment=experiment, run_name="compare", params={
            "budgets": ",".join(map(str, budgets)), "seeds": seeds, "methods": ",".join(methods)},
            tags={KIND_TAG: "compare-parent"})
        if pending:
            _run_children(pending, len(children), uri, experiment, parent, resources, concurrent, task, log)
        report = build_report(uri, experiment, {c.settings: c.variant for c in children})
        files = write_report(report, out)
        logger = RunLogger(uri, parent)
        for f in files:
            logger.client.log_artifact(parent, str(f), "report")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            end_run(uri, parent, status)
        if started_ray:
            import ray

            ray.shutdown()
    return report

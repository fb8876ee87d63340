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

This module is the command itself: reuse, the parent run, the report. Its pieces: `compare_plan` (which
children), `compare_tasks` (running them as Ray tasks), `compare_child` (one child's task and its MLflow run),
`compare_report` (the report from MLflow).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .compare_child import train_child
from .compare_plan import child_plan, plan_children
from .compare_report import (  # noqa: F401  (COLUMNS, format_markdown: moved there, re-exported here)
    COLUMNS,
    KIND_TAG,
    SETTINGS_TAG,
    _finished_runs,
    build_report,
    format_markdown,
    write_report,
)
from .compare_tasks import ChildResources, _check_cluster, _concurrency, _connect_ray, _label, _run_children
from .orphans import fail_orphaned_runs
from .tracking import RunLogger, check_tracking_uri, default_tracking_uri, end_run, start_run

# ChildResources is frozen, so one shared default is safe; a module-level name because ruff (B008) cannot see
# that it is frozen once it lives in another module.
_DEFAULT_RESOURCES = ChildResources()


def compare(config_path: str | None, overrides: list[str], budgets: list[float], seeds: int, methods: list[str],
            experiment: str, uri: str | None, out: Path, log: Callable[[str], None] = print, *,
            resources: ChildResources = _DEFAULT_RESOURCES, address: str = "",
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

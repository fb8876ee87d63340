"""Runs whose driver died (`kill -9`, OOM killer, a closed laptop) must not stay RUNNING in MLflow forever.

Every run this project creates carries tags naming its driver process: host, pid and the process's start
time (pid numbers are reused; the start time from /proc tells a reused pid from the original). The next
`train` or `compare` against the same tracking store marks RUNNING runs of dead drivers on this host
FAILED, with the reason as the `superweights.failure` tag. Drivers on other hosts cannot be checked from
here and are left alone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from .driver_process import HOST_TAG, PID_TAG, driver_alive
from .tracking import FAILURE_TAG, client_for, end_run, set_failure_tag


def fail_orphaned_runs(uri: str, log: Callable[[str], None] = print) -> list[str]:
    """Mark RUNNING runs of dead drivers on this host FAILED; returns their run ids. Never raises: a store
    it cannot search is reported by the command's own checks."""
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        return []  # a new store has no runs (and creating it here would print MLflow's migration lines)
    try:
        client = client_for(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"attributes.status = 'RUNNING' and "
                                  f"tags.`{HOST_TAG}` = '{socket.gethostname()}'", max_results=1000) if experiments else []
    except Exception:  # pragma: no cover - an unreachable store is the caller's one-line error
        return []
    failed = []
    for run in runs:
        tags = run.data.tags
        if driver_alive(tags) is not False:
            continue
        name = tags.get("superweights.run_name") or run.info.run_name
        reason = (f"driver process {tags[PID_TAG]} on {tags[HOST_TAG]} ended without closing this run (killed?); "
                  f"rerun with --name {name} to resume from its newest checkpoint")
        if FAILURE_TAG not in tags:
            set_failure_tag(uri, run.info.run_id, reason)
        end_run(uri, run.info.run_id, "FAILED")
        log(f"marked MLflow run {run.info.run_id} ({name}) FAILED: its driver process {tags[PID_TAG]} is gone")
        failed.append(run.info.run_id)
    return failed

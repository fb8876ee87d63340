"""The Ray cluster a training job runs on: check an address, join or start Ray, count its CPUs and GPUs.

`_init_ray` starts a local head on a loopback port of its own (never a bare `ray.init()`, which joins whatever
/tmp/ray/ray_current_cluster names) and pins every process of the job to it; `_cluster_check` refuses more
workers than CPUs/GPUs (Ray would wait forever); `worker_cpus` is what each worker reserves.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from urllib.parse import urlparse

from core.errors import SuperweightsError

from .exit_codes import reinstall_sigterm


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """A TCP connect with a short timeout: `ray.init` would otherwise retry for a long time."""
    if not address or address == "auto" or address.startswith("local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme in ("http", "https"):
        raise SuperweightsError(
            f"Ray address {address!r} is a dashboard (job submission) URL: pass the cluster's GCS address "
            "(host:6379) or ray://host:10001, or submit with `ray job submit --address "
            f"{address} -- python -m ray_jobs.train ...`"
        )
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SuperweightsError(f"Ray address {address!r} must look like host:port (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SuperweightsError(
            f"Ray cluster at {address} is not reachable ({e.strerror or type(e).__name__}); start one with "
            "`ray start --head` or leave --address empty to run a local Ray"
        ) from None


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train V2 controller flag


def _init_ray(address: str, log: Callable[[str], None]) -> bool:
    """Connect to / start Ray; True when this call started it (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]} if "RAY_AUTH_MODE" in os.environ else {}
    kwargs = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        # A job on an existing cluster: pin its processes to this cluster (Ray Train's placement-group cleaner
        # otherwise auto-detects one and raises "Found multiple active Ray instances" when another Ray runs
        # here) and no preemption watcher unless asked for (an `E core_worker ... PreemptionWatcher` line).
        env_vars.setdefault(PREEMPTION_WATCHER_ENV, os.environ.get(PREEMPTION_WATCHER_ENV, "0"))
        if "://" not in address and address != "auto":
            env_vars["RAY_ADDRESS"] = address
        # ray.init refuses an env var the submitted job's runtime env already sets (even to the same value)
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        already = (job.get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {k: v for k, v in env_vars.items() if k not in already}
        if env_vars:
            kwargs["runtime_env"] = {"env_vars": env_vars}
        ray.init(address=address, **kwargs)
        reinstall_sigterm()
        return True
    log("starting a local Ray instance ...")
    # A one-machine Ray has no node that can be drained, so Ray Train's preemption watcher has nothing to
    # watch; its actor only prints an `E core_worker ... max_restarts` line into every local run.
    env_vars.setdefault(PREEMPTION_WATCHER_ENV, os.environ.get(PREEMPTION_WATCHER_ENV, "0"))
    # Ray Train's placement-group cleaner finds "its" cluster by auto-detection, which raises (a traceback
    # in its thread) when another Ray runs on this machine. Our instance on a port we chose, named in
    # RAY_ADDRESS for every process of this job, makes auto-detection find exactly this one. Loopback only.
    port = _free_loopback_port()
    env_vars["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)  # read once, when the head node starts
    try:
        # "local": always a new instance. A bare ray.init() would join whatever cluster another session on
        # this machine started (its address is in /tmp/ray/ray_current_cluster), even a dead one.
        # No dashboard (start-up time, memory), hence no state API: Ray Train's placement-group cleaner then
        # warns every second that it cannot query it. Ray's own log level ERROR for this job's processes.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_config=ray.LoggingConfig(log_level="ERROR"), runtime_env={"env_vars": env_vars}, **kwargs)
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = previous
    reinstall_sigterm()
    return True


GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_check(workers: int, use_gpu: bool, cpus_per_worker: int = 1) -> None:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    if workers > cpus:
        raise SuperweightsError(
            f"{workers} workers need {workers} CPUs but the Ray cluster has {cpus:g}: use --workers <= {int(cpus)} "
            "(Ray would otherwise wait forever)"
        )
    if workers * max(cpus_per_worker, 1) > cpus:
        raise SuperweightsError(
            f"{workers} workers x {cpus_per_worker} CPUs need {workers * cpus_per_worker} CPUs but the Ray cluster "
            f"has {cpus:g}: lower --cpus-per-worker (0 = share the free CPUs)"
        )
    if use_gpu and workers > gpus:
        raise SuperweightsError(f"{workers} GPU workers need {workers} GPUs but the Ray cluster has {gpus:g}")


def worker_cpus(workers: int, cpus_per_worker: int) -> int:
    """CPUs each worker reserves (Ray then gives it that many OMP/torch threads). Default: the free CPUs shared
    evenly, so 1 worker on 2 CPUs trains with 2 threads, as in-process training does, not with 1."""
    if cpus_per_worker or workers == 0:
        return max(cpus_per_worker, 1)
    import ray

    return max(1, int(ray.available_resources().get("CPU", 1)) // workers)

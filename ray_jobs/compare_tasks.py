"""Running the children of `superweights compare` as Ray tasks: what each asks Ray for (`ChildResources`),
joining or starting Ray, how many run at once, the launch/wait/log loop (`_run_children`) and cancelling
the ones in flight when one fails or the comparison is interrupted."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from core.errors import SuperweightsError
from ensemble.data import absolute_paths
from ensemble.training import validate_device

from .compare_child import _child_name, _in_task, log_child, start_child_run
from .compare_plan import Child
from .tracking import end_run


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

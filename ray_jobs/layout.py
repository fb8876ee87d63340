"""How a Ray Train job's workers are laid out: `member_groups x data_replicas`, members balanced by FLOPs.

Pure arithmetic (no torch.distributed): the driver checks a layout before anything starts, the workers
(`ray_jobs.parallel`) use it to find their members, their replica group and their slice of each batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from core.errors import SuperweightsError


def available_cpus() -> int:
    """CPUs this process may use (cgroup/affinity aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def partition_members(flops: list[int | float], groups: int) -> tuple[tuple[int, ...], ...]:
    """Split member ids into `groups` non-empty sets with balanced total FLOPs.

    Longest-processing-time greedy: members by decreasing FLOPs, each to the currently lightest group
    (ties: lower group id, then lower member id), so the result is deterministic. Ids sorted per group.
    """
    n = len(flops)
    if not 1 <= groups <= n:
        raise SuperweightsError(
            f"cannot split {n} member{'s' if n != 1 else ''} over {groups} member groups: "
            f"ray.member_groups must be between 1 and {n}"
        )
    order = sorted(range(n), key=lambda i: (-flops[i], i))
    load = [0.0] * groups
    out: list[list[int]] = [[] for _ in range(groups)]
    for i in order:
        # An empty group takes the next member first so that no group stays empty.
        g = min(range(groups), key=lambda k: (len(out[k]) > 0, load[k], k)) if any(not o for o in out) \
            else min(range(groups), key=lambda k: (load[k], k))
        out[g].append(i)
        load[g] += float(flops[i])
    return tuple(tuple(sorted(o)) for o in out)


@dataclass(frozen=True)
class Layout:
    """`member_groups x data_replicas` workers; `groups[g]` = member ids that group g computes."""

    member_groups: int
    data_replicas: int
    groups: tuple[tuple[int, ...], ...]

    @property
    def world(self) -> int:
        return self.member_groups * self.data_replicas

    def group_of(self, rank: int) -> int:
        return rank // self.data_replicas

    def replica_of(self, rank: int) -> int:
        return rank % self.data_replicas

    def members_of(self, rank: int) -> list[int]:
        return list(self.groups[self.group_of(rank)])

    def owner_of(self, member: int) -> int:
        """The rank whose copy of `member`'s running statistics is authoritative (replica 0 of its group)."""
        for g, ids in enumerate(self.groups):
            if member in ids:
                return g * self.data_replicas
        raise KeyError(member)

    def replica_ranks(self, group: int) -> list[int]:
        return [group * self.data_replicas + r for r in range(self.data_replicas)]

    def to_dict(self) -> dict:
        return {"member_groups": self.member_groups, "data_replicas": self.data_replicas,
                "groups": [list(g) for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(d["member_groups"], d["data_replicas"], tuple(tuple(g) for g in d["groups"]))


def resolve_layout(workers: int, member_groups: int, data_replicas: int, flops: list[int | float],
                   batch_size: int) -> Layout:
    """Choose `member_groups x data_replicas == max(workers, 1)`; 0 means "derive it".

    Default: as many member groups as the workers allow (member parallelism needs no batch-norm sync and
    no batch split), the rest as data replicas.
    """
    n = len(flops)
    w = max(workers, 1)
    for key, value in (("ray.member_groups", member_groups), ("ray.data_replicas", data_replicas)):
        if value < 0:
            raise SuperweightsError(f"{key} must be >= 0 (0 = derive from ray.workers), got {value}")
    if member_groups > n:
        partition_members(flops, member_groups)  # raises the "cannot split" error
    if member_groups and data_replicas:
        if member_groups * data_replicas != w:
            raise SuperweightsError(
                f"ray.member_groups x ray.data_replicas = {member_groups} x {data_replicas} = "
                f"{member_groups * data_replicas} must equal the {w} worker{'s' if w != 1 else ''}"
            )
    elif member_groups:
        if w % member_groups:
            raise SuperweightsError(f"{w} workers cannot be split into {member_groups} member groups (not a divisor)")
        data_replicas = w // member_groups
    elif data_replicas:
        if w % data_replicas:
            raise SuperweightsError(f"{w} workers cannot be split into {data_replicas} data replicas (not a divisor)")
        member_groups = w // data_replicas
    else:
        member_groups = max(d for d in range(1, min(w, n) + 1) if w % d == 0)
        data_replicas = w // member_groups
    groups = partition_members(flops, member_groups)
    if batch_size % data_replicas:
        raise SuperweightsError(
            f"train.batch_size {batch_size} is not divisible by the {data_replicas} data replicas: "
            f"choose a batch size that is a multiple of {data_replicas}"
        )
    return Layout(member_groups, data_replicas, groups)

"""The anytime record (anytime.json in a checkpoint folder): exits, per-step FLOPs and the schedule.

`anytime_record` is the one function that computes it: the training pipeline writes it into the final
checkpoint (`finish_checkpoint`, which `ray_jobs.worker` hands to the training loop: `ensemble` may not import
`anytime`), and `anytime.store.load_anytime` computes it for folders without one. `check_record` is what every
load checks it against (the model's members, exits, re-measured FLOPs, a valid schedule).

Keys: members, input_shape, exit_stages, num_exits, step_flops, member_flops, direct_flops, schedule {kind,
steps, cumulative_flops} (stable, documented in the README).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.config import Config
from ensemble.data import DatasetInfo
from ensemble.model import StackedEnsemble
from ensemble.planning import example_input, meta_members

from .costs import cumulative_flops, direct_flops, step_flops
from .schedule import make_schedule

ANYTIME_FILE = "anytime.json"


@torch.no_grad()
def exit_probabilities(model, loader, device) -> tuple[list[Tensor], Tensor]:
    """Softmax of every exit of every member: list over members of (N, E_m, C), and labels (N,)."""
    model.eval()
    per_member: list[list[Tensor]] = [[] for _ in model.members]
    labels = []
    for x, y in loader:
        for m, out in enumerate(model.forward_exits_list(x.to(device))):
            per_member[m].append(out.float().softmax(-1).cpu())
        labels.append(y)
    return [torch.cat(p) for p in per_member], torch.cat(labels)


def anytime_record(model, config: Config, info: DatasetInfo, val_loader=None, device="cpu") -> dict:
    """The anytime.json content: exits, per-step FLOPs (measured once per plan) and the schedule (greedy on
    `val_loader`'s examples)."""
    metas = meta_members(config, info)
    example = example_input(info)
    flops = step_flops(metas, example)
    exit_probs = labels = None
    if config.anytime.schedule == "greedy" and val_loader is not None:
        exit_probs, labels = exit_probabilities(model, val_loader, device)
    steps = make_schedule(config.anytime.schedule, config.anytime.order, exit_probs, labels, flops)
    return {
        "members": list(model.names),
        "input_shape": [info.in_channels, *info.image_size],
        "exit_stages": [list(getattr(m, "exit_stages", [len(getattr(m, "stages", [None])) - 1])) for m in metas],
        "num_exits": [len(f) for f in flops],
        "step_flops": flops,
        "member_flops": [sum(f) for f in flops],
        "direct_flops": direct_flops(metas, example),
        "schedule": {"kind": config.anytime.schedule, "steps": [list(s) for s in steps],
                     "cumulative_flops": cumulative_flops(flops, steps)},
    }


def write_record(folder, record: dict) -> Path:
    path = Path(folder) / ANYTIME_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def finish_checkpoint(folder, model, config: Config, data, device) -> None:
    """The training pipeline's last step (`ensemble.loop.Session(finish=...)`): the anytime record into the
    final checkpoint `folder`, the greedy schedule chosen on `data.val`."""
    write_record(folder, anytime_record(model, config, data.info, data.val, device))


def check_record(record: dict, model: StackedEnsemble, config: Config, info: DatasetInfo, where: str) -> dict:
    """Raise a one-line error unless `record` describes `model` (names, exits, FLOPs, a valid schedule)."""
    try:
        names, exits, flops = record["members"], record["num_exits"], record["step_flops"]
        record["direct_flops"], record["exit_stages"]  # noqa: B018  (required keys)
        steps = record_steps(record)
    except (KeyError, TypeError) as e:
        raise SuperweightsError(f"{where} is malformed (missing {e})") from None
    if names != list(model.names) or exits != model.num_exits:
        raise SuperweightsError(f"{where} does not match the checkpoint: members {names} with exits {exits}, "
                                f"checkpoint has {list(model.names)} with exits {model.num_exits}")
    measured = step_flops(meta_members(config, info), example_input(info))
    if flops != measured:
        raise SuperweightsError(f"{where} does not match the checkpoint: step FLOPs {flops} != measured {measured}")
    expected = sorted((m, k) for m, e in enumerate(exits) for k in range(e))
    in_order = all(steps.index((m, k)) < steps.index((m, k + 1)) for m, k in steps if (m, k + 1) in steps)
    if sorted(steps) != expected or not in_order:
        raise SuperweightsError(f"{where}: the schedule must run every exit of every member once, in order per member")
    return record


def record_steps(record: dict) -> list[tuple[int, int]]:
    """The schedule's steps as (member, exit) tuples."""
    return [tuple(s) for s in record["schedule"]["steps"]]

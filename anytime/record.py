"""The anytime record (anytime.json in a checkpoint folder): exits, per-step FLOPs, the schedule, and what is
fitted on the validation split (issue 15): the combiner (per-exit temperatures, per-prefix mixing weights,
`anytime.fit`), its calibration (per-prefix temperatures) and the early-exit thresholds (`anytime.early_exit`).

`anytime_record` is the one function that computes it: the training pipeline writes it into the final
checkpoint (`finish_checkpoint`, which `ray_jobs.worker` hands to the training loop: `ensemble` may not import
`anytime`), and `anytime.store.load_anytime` computes it for folders without one. `check_record` is what every
load checks it against (the model's members, exits, re-measured FLOPs, a valid schedule and combiner).
`load_anytime` adds the fitted parts to records written before they existed (`fitted_parts`).

Keys: members, input_shape, exit_stages, num_exits, step_flops, member_flops, direct_flops, schedule {kind,
steps, cumulative_flops}; fitted (absent without validation data: then the plain mean combiner applies and
`mean_flops` budgets are unavailable): combiner {kind, exit_temperatures, weights, lambdas}, calibration {kind,
prefix_temperatures}, early_exit {score, rule, margin, table}, validation {examples, accuracy, accuracy_plain}
(stable, documented in the README).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.config import Config
from ensemble.data import DatasetInfo
from ensemble.metrics import accuracy
from ensemble.model import StackedEnsemble
from ensemble.planning import example_input, meta_members

from .combine import Combiner, LatestExits
from .costs import cumulative_flops, direct_flops, step_flops
from .early_exit import MARGIN, SCORES, confidence, threshold_table
from .fit import fit_combiner
from .schedule import make_schedule

ANYTIME_FILE = "anytime.json"


@torch.no_grad()
def exit_logits(model, loader, device) -> tuple[list[Tensor], Tensor]:
    """Logits (float32) of every exit of every member: list over members of (N, E_m, C), and labels (N,)."""
    model.eval()
    per_member: list[list[Tensor]] = [[] for _ in model.members]
    labels = []
    for x, y in loader:
        for m, out in enumerate(model.forward_exits_list(x.to(device))):
            per_member[m].append(out.float().cpu())
        labels.append(y)
    return [torch.cat(p) for p in per_member], torch.cat(labels)


def exit_probabilities(model, loader, device) -> tuple[list[Tensor], Tensor]:
    """Softmax of every exit of every member: list over members of (N, E_m, C), and labels (N,)."""
    logits, labels = exit_logits(model, loader, device)
    return [z.softmax(-1) for z in logits], labels


def plain_accuracies(steps, exit_logits_: list[Tensor], labels: Tensor) -> list[float]:
    """Accuracy after every prefix with the plain mean of latest exits (`combine`, the combiner before fitting)."""
    latest, out = LatestExits(), []
    for m, k in steps:
        latest.update(m, exit_logits_[m][:, k].softmax(-1))
        out.append(accuracy(latest.probs(), labels))
    return out


def fitted_parts(steps, flops, exit_logits_: list[Tensor], labels: Tensor, score: str = "max_prob") -> dict:
    """The record's fitted entries along `steps` from validation logits: combiner, calibration, early-exit
    table (confidence `score`, one of `early_exit.SCORES`) and the validation accuracies."""
    if score not in SCORES:
        raise SuperweightsError(f"early-exit score must be one of {', '.join(SCORES)}, got {score!r}")
    combiner, lambdas = fit_combiner(steps, exit_logits_, labels)
    probs = combiner.prefix_probs(exit_logits_)
    scores = torch.stack([confidence(p, score) for p in probs], 1)
    correct = torch.stack([p.argmax(-1) == labels for p in probs], 1)
    parts = combiner.to_record()
    parts["combiner"]["lambdas"] = lambdas
    parts["early_exit"] = {"score": score, "rule": "one confidence level for every step, fitted per target mean "
                                                   "FLOPs on validation (anytime.early_exit)",
                           "margin": MARGIN, "table": threshold_table(scores, correct, cumulative_flops(flops, steps))}
    parts["validation"] = {"examples": int(labels.numel()), "accuracy": [accuracy(p, labels) for p in probs],
                           "accuracy_plain": plain_accuracies(steps, exit_logits_, labels)}
    return parts


FITTED = ("combiner", "calibration", "early_exit")


def is_fitted(record: dict) -> bool:
    return all(k in record for k in FITTED)


def anytime_record(model, config: Config, info: DatasetInfo, val_loader=None, device="cpu") -> dict:
    """The anytime.json content: exits, per-step FLOPs (measured once per plan), the schedule (greedy on
    `val_loader`'s examples) and, with `val_loader`, the parts fitted on it (`fitted_parts`)."""
    metas = meta_members(config, info)
    example = example_input(info)
    flops = step_flops(metas, example)
    logits = labels = None
    if val_loader is not None:
        logits, labels = exit_logits(model, val_loader, device)
    greedy = config.anytime.schedule == "greedy" and logits is not None
    exit_probs = [z.softmax(-1) for z in logits] if greedy else None
    steps = make_schedule(config.anytime.schedule, config.anytime.order, exit_probs, labels if greedy else None,
                          flops)
    record = {
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
    if logits is not None:
        record.update(fitted_parts(steps, flops, logits, labels, config.anytime.exit_score))
    return record


def write_record(folder, record: dict) -> Path:
    path = Path(folder) / ANYTIME_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def finish_checkpoint(folder, model, config: Config, data, device) -> None:
    """The training pipeline's last step (`ensemble.loop.Session(finish=...)`): the anytime record into the
    final checkpoint `folder`, the greedy schedule, combiner, calibration and early exit fitted on `data.val`."""
    write_record(folder, anytime_record(model, config, data.info, data.val, device))


def check_record(record: dict, model: StackedEnsemble, config: Config, info: DatasetInfo, where: str) -> dict:
    """Raise a one-line error unless `record` describes `model` (names, exits, FLOPs, a valid schedule)."""
    try:
        names, exits, flops = record["members"], record["num_exits"], record["step_flops"]
        record["direct_flops"], record["exit_stages"]  # noqa: B018  (required keys)
        steps = record_steps(record)
        combiner = Combiner.from_record(record, steps)
        early = record.get("early_exit") or {"score": "max_prob", "table": []}
        bad_early = early["score"] not in SCORES or not all(
            0 <= e["confidence"] <= 1 and e["bound"] >= 0 and e["mean_flops"] >= 0 for e in early["table"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise SuperweightsError(f"{where} is malformed (missing or invalid {e})") from None
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
    combiner.check(exits, where)
    if bad_early:
        raise SuperweightsError(f"{where}: early_exit must have a score in {', '.join(SCORES)} and levels in [0, 1] "
                                "with FLOPs >= 0")
    return record


def record_steps(record: dict) -> list[tuple[int, int]]:
    """The schedule's steps as (member, exit) tuples."""
    return [tuple(s) for s in record["schedule"]["steps"]]

"""Anytime evaluation of a checkpoint: accuracy vs cumulative FLOPs along the schedule (with the record's
combiner, and with the plain mean before fitting), the budgeted-batch curve (per-input early exit at every
fitted confidence level: accuracy vs mean FLOPs per image), every member subset (the papers' protocol), every
exit of every member, NLL/ECE (calibrated and not)/disagreement at each point, and the normalised area under
the accuracy-FLOPs curves. Writes anytime.csv, budgeted.csv, subsets.csv, exits.csv, anytime.png and
summary.json (`anytime.report`; names and columns stable, documented in the README, "Anytime prediction").
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.data import load_data
from ensemble.metrics import accuracy, disagreement, ece, nll

from .combine import Combiner, LatestExits, combine
from .costs import cumulative_flops
from .early_exit import choose, confidence, steps_run
from .record import exit_logits
from .report import format_table, write_outputs
from .store import AnytimeCheckpoint, load_anytime

__all__ = ["SPLITS", "evaluate_anytime", "format_table", "normalized_auc", "point_metrics", "run_evaluation"]

SPLITS = ("val", "test")
FRACTIONS = (0.25, 0.5, 0.75)  # of the full schedule's FLOPs: the summary's fixed-prefix vs budgeted-batch table


def normalized_auc(cumulative_flops: list[float], accuracies: list[float]) -> float:
    """Area under the anytime accuracy curve divided by the total FLOPs, in [0, 1].

    Accuracy is a step function of the compute spent: 0 before the first step completes, then the
    accuracy of the longest prefix finished, up to the last step's cumulative FLOPs.
    """
    if not cumulative_flops:
        return 0.0
    total = float(cumulative_flops[-1])
    if total <= 0:
        return float(accuracies[-1])
    area = sum(a * (cumulative_flops[i + 1] - cumulative_flops[i]) for i, a in enumerate(accuracies[:-1]))
    return area / total


def point_metrics(member_probs: Tensor, labels: Tensor) -> dict:
    """Metrics of the ensemble (`combine`) of member probabilities (N, M, C)."""
    mean = combine(member_probs)
    return {"accuracy": accuracy(mean, labels), "nll": nll(mean, labels), "ece": ece(mean, labels),
            "disagreement": disagreement(member_probs)}


def _metrics(p: Tensor, labels: Tensor) -> dict:
    return {"accuracy": accuracy(p, labels), "nll": nll(p, labels), "ece": ece(p, labels)}


def budgeted_batch(ckpt: AnytimeCheckpoint, prefix_probs: list[Tensor], labels: Tensor) -> list[dict]:
    """Per fitted confidence level (the record's early-exit table), per-input early exit on this split: the rows
    of budgeted.csv, by mean FLOPs. Stopped rows take their prefix's probabilities, as the predictor does."""
    early = ckpt.record.get("early_exit")
    if not early:
        return []
    scores = torch.stack([confidence(p, early["score"]) for p in prefix_probs], 1)
    stacked = torch.stack(prefix_probs, 1)  # (N, n, C)
    cum = torch.tensor(ckpt.record["schedule"]["cumulative_flops"], dtype=torch.float64)
    rows = []
    for e in early["table"]:
        k = steps_run(scores, e["confidence"]) - 1
        p = stacked[torch.arange(len(k)), k]
        mean = float(cum[k].mean())
        rows.append({"threshold": e["confidence"], "val_mean_flops": e["mean_flops"], "mean_flops": round(mean, 3),
                     "fraction_of_full": round(mean / float(cum[-1]), 4), "mean_steps": float((k + 1).double().mean()),
                     **_metrics(p, labels)})
    return sorted(rows, key=lambda r: (r["mean_flops"], r["threshold"]))


def at_fractions(ckpt: AnytimeCheckpoint, schedule: list[dict], budgeted: list[dict]) -> dict:
    """At 25/50/75% of the full FLOPs: the fixed prefix that fits vs the early-exit level a `{"mean_flops": F}`
    request gets (`early_exit.choose`), on this split."""
    total = schedule[-1]["cumulative_flops"]
    table = (ckpt.record.get("early_exit") or {}).get("table") or []
    out = {}
    for f in FRACTIONS:
        budget = f * total
        fixed = [r for r in schedule if r["cumulative_flops"] <= budget]
        entry = choose(table, budget)
        row = next((r for r in budgeted if entry is not None and r["threshold"] == entry["confidence"]), None)
        out[str(f)] = {"flops": budget, "fixed_accuracy": fixed[-1]["accuracy"] if fixed else None,
                       "fixed_flops": fixed[-1]["cumulative_flops"] if fixed else None,
                       "budgeted_accuracy": row["accuracy"] if row else None,
                       "budgeted_mean_flops": row["mean_flops"] if row else None,
                       "threshold": row["threshold"] if row else None}
    return out


def evaluate_anytime(ckpt: AnytimeCheckpoint, logits: list[Tensor], labels: Tensor) -> dict:
    """Tables (lists of row dicts) and the summary from every exit's logits (`(N, E_m, C)` per member) on one
    split."""
    rec, names = ckpt.record, list(ckpt.model.names)
    flops = rec["step_flops"]
    exit_probs = [z.softmax(-1) for z in logits]
    comb = Combiner.from_record(rec, ckpt.steps)
    fitted = comb.prefix_probs(logits)
    uncal = comb.uncalibrated().prefix_probs(logits)
    schedule, latest = [], LatestExits()
    for i, ((m, k), cum) in enumerate(zip(ckpt.steps, cumulative_flops(flops, ckpt.steps))):
        latest.update(m, exit_probs[m][:, k])
        plain = combine(latest.stacked())
        row = {"step": i + 1, "member": names[m], "exit": k, "stage": rec["exit_stages"][m][k],
               "step_flops": flops[m][k], "cumulative_flops": cum, "members_started": len(latest),
               **_metrics(fitted[i], labels), "disagreement": disagreement(latest.stacked()),
               "nll_uncalibrated": nll(uncal[i], labels), "ece_uncalibrated": ece(uncal[i], labels)}
        row.update({f"{key}_plain": v for key, v in _metrics(plain, labels).items()})
        schedule.append(row)
    subsets = []
    for r in range(1, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), r):
            row = {"subset": "+".join(names[m] for m in subset), "size": r,
                   "flops": sum(rec["direct_flops"][m] for m in subset)}
            row.update(point_metrics(torch.stack([exit_probs[m][:, -1] for m in subset], 1), labels))
            subsets.append(row)
    exits = []
    for m, name in enumerate(names):
        for k in range(exit_probs[m].shape[1]):
            p = exit_probs[m][:, k]
            exits.append({"member": name, "exit": k, "stage": rec["exit_stages"][m][k],
                          "flops": sum(flops[m][: k + 1]), "accuracy": accuracy(p, labels),
                          "nll": nll(p, labels), "ece": ece(p, labels)})
    budgeted = budgeted_batch(ckpt, fitted, labels)
    last, cums = schedule[-1], [r["cumulative_flops"] for r in schedule]
    summary = {
        "schedule": rec["schedule"]["kind"], "members": names, "method": ckpt.config.bank.method,
        "combiner": "fitted" if "combiner" in rec else "plain",
        "final_accuracy": last["accuracy"], "auc": normalized_auc(cums, [r["accuracy"] for r in schedule]),
        "best_prefix_accuracy": max(r["accuracy"] for r in schedule),
        "nll": last["nll"], "ece": last["ece"], "disagreement": last["disagreement"],
        "total_flops": last["cumulative_flops"], "examples": int(labels.numel()),
        "plain": {"final_accuracy": last["accuracy_plain"], "auc": normalized_auc(cums, [r["accuracy_plain"] for r in schedule]),
                  "best_prefix_accuracy": max(r["accuracy_plain"] for r in schedule),
                  "nll": last["nll_plain"], "ece": last["ece_plain"]},
        "uncalibrated": {"nll": last["nll_uncalibrated"], "ece": last["ece_uncalibrated"]},
        "budgeted": budgeted_summary(rec, budgeted, last["cumulative_flops"]),
        "at_fraction": at_fractions(ckpt, schedule, budgeted),
    }
    return {"anytime": schedule, "budgeted": budgeted, "subsets": subsets, "exits": exits, "summary": summary}


def budgeted_summary(rec: dict, budgeted: list[dict], total: float) -> dict | None:
    """The budgeted-batch curve's normalised area (as `normalized_auc`, from the first step's FLOPs on) and its
    confidence score; None without fitted levels."""
    if not budgeted:
        return None
    xs, ys = [r["mean_flops"] for r in budgeted], [r["accuracy"] for r in budgeted]
    area = sum(ys[i] * (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)) + ys[-1] * max(0.0, total - xs[-1])
    return {"score": rec["early_exit"]["score"], "levels": len(budgeted), "auc": area / total if total else ys[-1]}


def run_evaluation(folder, split: str = "test", out_dir=None, device: str = "cpu") -> tuple[dict, Path]:
    """Evaluate a checkpoint folder on `split`; write the files to `out_dir` (default FOLDER/anytime-SPLIT)."""
    if split not in SPLITS:
        raise SuperweightsError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    ckpt = load_anytime(folder, device)
    t = ckpt.config.train
    data = load_data(ckpt.config.data, t.seed, t.batch_size, t.eval_batch_size, device)
    if (data.info.in_channels, *data.info.image_size) != (ckpt.info.in_channels, *ckpt.info.image_size):
        raise SuperweightsError(f"data {data.info.name} does not match the checkpoint's input shape")
    logits, labels = exit_logits(ckpt.model, getattr(data, split), device)
    result = evaluate_anytime(ckpt, logits, labels)
    result["summary"]["split"] = split
    out = Path(out_dir) if out_dir is not None else Path(folder) / f"anytime-{split}"
    write_outputs(result, out, f"{', '.join(ckpt.model.names)} ({ckpt.config.bank.method}, {split})")
    return result, out

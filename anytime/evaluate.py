"""Anytime evaluation of a checkpoint: accuracy vs cumulative FLOPs along the schedule, every member
subset (the papers' protocol), every exit of every member, NLL/ECE/disagreement at each point, and the
normalised area under the accuracy-FLOPs curve. Writes anytime.csv, subsets.csv, exits.csv, anytime.png
and summary.json (names and columns stable, documented in the README, "Anytime prediction").
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.data import load_data
from ensemble.metrics import accuracy, disagreement, ece, nll

from .combine import LatestExits, combine
from .costs import cumulative_flops
from .record import exit_probabilities
from .store import AnytimeCheckpoint, load_anytime

SPLITS = ("val", "test")


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


def evaluate_anytime(ckpt: AnytimeCheckpoint, exit_probs: list[Tensor], labels: Tensor) -> dict:
    """Tables (lists of row dicts) and the summary from every exit's probabilities on one split."""
    rec, names = ckpt.record, list(ckpt.model.names)
    flops = rec["step_flops"]
    schedule, latest = [], LatestExits()
    for i, ((m, k), cum) in enumerate(zip(ckpt.steps, cumulative_flops(flops, ckpt.steps))):
        latest.update(m, exit_probs[m][:, k])
        row = {"step": i + 1, "member": names[m], "exit": k, "stage": rec["exit_stages"][m][k],
               "step_flops": flops[m][k], "cumulative_flops": cum, "members_started": len(latest)}
        row.update(point_metrics(latest.stacked(), labels))
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
    last = schedule[-1]
    summary = {
        "schedule": rec["schedule"]["kind"], "members": names, "method": ckpt.config.bank.method,
        "final_accuracy": last["accuracy"], "auc": normalized_auc([r["cumulative_flops"] for r in schedule],
                                                                  [r["accuracy"] for r in schedule]),
        "nll": last["nll"], "ece": last["ece"], "disagreement": last["disagreement"],
        "total_flops": last["cumulative_flops"], "examples": int(labels.numel()),
    }
    return {"anytime": schedule, "subsets": subsets, "exits": exits, "summary": summary}


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    s = result["anytime"]
    xs = [0] + [r["cumulative_flops"] / 1e6 for r in s]
    ys = [0] + [r["accuracy"] for r in s]
    ax.step(xs, ys, where="post", color="C0", label=f"schedule (AUC {result['summary']['auc']:.3f})")
    ax.plot(xs[1:], ys[1:], "o", color="C0", ms=4)
    sub = result["subsets"]
    ax.scatter([r["flops"] / 1e6 for r in sub], [r["accuracy"] for r in sub], marker="x", color="C3",
               label="member subsets (full members)", zorder=3)
    ax.set_xlabel("cumulative MFLOPs per image")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict) -> str:
    lines = [f"{'step':>4}  {'member':<16}{'exit':>5}{'cum MFLOPs':>12}{'acc':>8}{'NLL':>8}{'ECE':>8}{'disagr':>8}"]
    for r in result["anytime"]:
        lines.append(f"{r['step']:>4}  {r['member']:<16}{r['exit']:>5}{r['cumulative_flops'] / 1e6:>12.3f}"
                     f"{r['accuracy']:>8.4f}{r['nll']:>8.4f}{r['ece']:>8.4f}{r['disagreement']:>8.4f}")
    s = result["summary"]
    lines += ["", f"{len(result['subsets'])} member subsets; best "
              + max(result["subsets"], key=lambda r: r["accuracy"])["subset"],
              f"final accuracy {s['final_accuracy']:.4f}  AUC {s['auc']:.4f}  NLL {s['nll']:.4f}  ECE {s['ece']:.4f}"]
    return "\n".join(lines)


def run_evaluation(folder, split: str = "test", out_dir=None, device: str = "cpu") -> tuple[dict, Path]:
    """Evaluate a checkpoint folder on `split`; write the files to `out_dir` (default FOLDER/anytime-SPLIT)."""
    if split not in SPLITS:
        raise SuperweightsError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    ckpt = load_anytime(folder, device)
    t = ckpt.config.train
    data = load_data(ckpt.config.data, t.seed, t.batch_size, t.eval_batch_size)
    if (data.info.in_channels, *data.info.image_size) != (ckpt.info.in_channels, *ckpt.info.image_size):
        raise SuperweightsError(f"data {data.info.name} does not match the checkpoint's input shape")
    exit_probs, labels = exit_probabilities(ckpt.model, getattr(data, split), device)
    result = evaluate_anytime(ckpt, exit_probs, labels)
    result["summary"]["split"] = split
    out = Path(out_dir) if out_dir is not None else Path(folder) / f"anytime-{split}"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("anytime", "subsets", "exits"):
        _write_csv(out / f"{name}.csv", result[name])
    plot(result, out / "anytime.png", f"{', '.join(ckpt.model.names)} ({ckpt.config.bank.method}, {split})")
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2) + "\n")
    return result, out

"""The two figures of `superweights compare`: accuracy vs parameters, and the anytime curves by method.

Kept apart from the MLflow side (compare.py): these read only the report dict that `build_report` makes.
"""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def family(method: str) -> str:
    """Plot family of a table row: every `member NAME` row is one family."""
    return "members alone" if method.startswith("member ") else method


def plot_accuracy_vs_params(report: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    by_family: dict[str, list] = {}
    for r in report["rows"]:
        by_family.setdefault(family(r["method"]), []).append(r)
    for name, rs in by_family.items():
        if name == "full":
            ax.axhline(rs[0]["accuracy_mean"], color="black", ls="--", lw=1, label="full ensemble (reference)")
        rs = sorted(rs, key=lambda r: r["total_params"])
        ax.errorbar([r["total_params"] for r in rs], [r["accuracy_mean"] for r in rs],
                    yerr=[r["accuracy_std"] for r in rs], marker="o", capsize=3,
                    ls="none" if name in ("full", "members alone") else "-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("total trainable parameters (log scale; bank + coefficients + norms/biases)")
    ax.set_ylabel("ensemble test accuracy (mean +- std over seeds)")
    ax.set_title("Accuracy vs parameters")
    reference = report.get("reference_params")
    if reference:  # the same axis read as a share of the full ensemble
        top = ax.secondary_xaxis("top", functions=(lambda p: 100 * p / reference, lambda q: q * reference / 100))
        top.set_xlabel("% of the full ensemble's parameters")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: points sit everywhere
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_anytime_panels(report: dict, path: Path) -> None:
    """One panel per method (budgets coloured light to dark), the full ensemble dashed in every panel:
    a single overlay of every curve was unreadable past a handful of them."""
    plt = _pyplot()
    curves = [c for c in report["curves"] if c["flops"]]
    full = next((c for c in curves if c["variant"] == "full"), None)
    panels: dict[str, list] = {}
    for c in curves:
        if c["variant"] != "full":
            panels.setdefault(family(c["variant"]), []).append(c)
    if not panels and full is not None:
        panels["full"] = []
    cols = min(3, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols) if panels else 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), sharex=True, sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (name, cs) in zip(axes.flat, panels.items()):
        cs = sorted(cs, key=lambda c: (c["budget"] is None, c["budget"] or 0.0, c["variant"]))
        for i, c in enumerate(cs):
            label = c["variant"].removeprefix("member ") if name == "members alone" else f"budget {c['budget']}"
            color = cmap(0.9 * i / max(1, len(cs) - 1)) if name != "members alone" else None
            ax.step([f / 1e6 for f in c["flops"]], c["accuracy"], where="post", marker=".", color=color, label=label)
        if full is not None:
            ax.step([f / 1e6 for f in full["flops"]], full["accuracy"], where="post", color="black", ls="--", lw=1,
                    label="full ensemble")
        ax.set_title(name)
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("cumulative MFLOPs per image (log scale)")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    fig.suptitle("Anytime curves along each schedule (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

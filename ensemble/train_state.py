"""Resumable checkpoints: a model checkpoint folder (`ensemble.checkpoint`) + optimizer + loop state.

Folder = weights.safetensors, plan.json, config.json, metrics.json (what `load_checkpoint` reads) +
optimizer.pt (optimizer and LR-schedule state: tensors and numbers only, read back with
`torch.load(weights_only=True)`) + train_state.json (epoch, history, resumes and whatever the caller adds,
e.g. the MLflow run id), written last so that its presence marks the folder complete.

The plan is read back from plan.json, not recomputed from the config: after gradient regrouping or
coefficient unsharing the run continues on the learned plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import load_plan, save_checkpoint

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"


def write_train_state(folder: Path, config, info, model, optimizer, scheduler, metrics: dict, history: list[dict],
                      epoch: int, resumes: list[int] = (), extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder, config, info, model, metrics, history)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / OPTIMIZER_FILE)
    # Every file's size: Ray persists a checkpoint by copying its folder in no particular order, so a copy
    # cut short (Ctrl-C, a dead node) can hold this file but not all of the others, or only part of them.
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != STATE_FILE}
    state = {**(extra or {}), "epoch": epoch, "history": history, "files": files,
             "resumes": list(resumes)}  # epochs training was resumed at (restarts and reruns)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return folder


def read_train_state(folder: Path):
    """(train_state.json content, the bank plan of the checkpoint or None for `full`)."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    _, _, plan = load_plan(folder)
    return state, plan


def restore_into(folder: Path, model, optimizer, scheduler, device) -> None:
    """Load model + optimizer + scheduler state in place (the model must be built on the folder's plan)."""
    folder = Path(folder)
    model.load_state_dict(load_file(str(folder / "weights.safetensors"), device=str(device)))
    opt = torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])


def is_complete(folder: Path) -> bool:
    """train_state.json is there, readable, and every file it lists has the size it was written with."""
    try:
        files = json.loads((Path(folder) / STATE_FILE).read_text()).get("files", {})
    except (OSError, ValueError):
        return False
    for name, size in files.items():
        try:
            if (Path(folder) / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def latest_complete(run_dir: Path, pattern: str = "checkpoint_epoch_*") -> Path | None:
    """The newest complete checkpoint folder under `run_dir` (see `is_complete`); folder names sort by epoch."""
    try:
        folders = sorted(Path(run_dir).glob(pattern), reverse=True)
    except OSError:  # e.g. storage another node cannot see
        return None
    return next((p for p in folders if is_complete(p)), None)

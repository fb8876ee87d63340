"""Checkpoint folders: weights.safetensors + plan.json + config.json + metrics.json (never pickle).

plan.json holds what is needed to rebuild the model without data files: the dataset's shape/class
count/normalisation, the member names and, for SuperWeight ensembles, the full bank plan.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.errors import SuperweightsError
from core.plan import Plan
from core.ssn import SSNPlan

from .config import Config, from_dict
from .data import DatasetInfo
from .model import StackedEnsemble, SuperWeightEnsemble, build_ensemble

FILES = ("weights.safetensors", "plan.json", "config.json", "metrics.json")


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_checkpoint(out_dir, config: Config, info: DatasetInfo, model: StackedEnsemble, metrics: dict,
                    history: list[dict] | None = None) -> Path:
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "weights.safetensors"))
    plan = model.plan.to_json() if isinstance(model, SuperWeightEnsemble) else None
    info_json = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(info).items()}
    _write_json(out / "plan.json", {"method": config.bank.method, "dataset": info_json,
                                    "members": list(model.names), "bank": plan})
    _write_json(out / "config.json", config.to_dict())
    _write_json(out / "metrics.json", {**metrics, "history": history or []})
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SuperweightsError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def load_plan(folder) -> tuple[Config, DatasetInfo, Plan | None]:
    """(config, dataset info, bank plan or None for `full`) from a checkpoint folder; one-line errors."""
    path = Path(folder)
    if not path.is_dir():
        raise SuperweightsError(f"checkpoint folder {str(path)!r} does not exist")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise SuperweightsError(f"checkpoint {str(path)!r} is missing {', '.join(missing)}")
    config = from_dict(_read_json(path / "config.json"))
    plan_json = _read_json(path / "plan.json")
    try:
        d = plan_json["dataset"]
        info = DatasetInfo(d["name"], d["in_channels"], tuple(d["image_size"]), d["num_classes"],
                           tuple(d["mean"]), tuple(d["std"]))
        bank = plan_json["bank"]
        plan = None if bank is None else (SSNPlan if bank.get("method") == "ssn" else Plan).from_json(bank)
    except (KeyError, TypeError, AttributeError) as e:
        raise SuperweightsError(f"{path / 'plan.json'} is malformed (missing {e})") from None
    if plan_json.get("method") != config.bank.method or (plan is None) != (config.bank.method == "full"):
        raise SuperweightsError(f"{path / 'plan.json'} does not match config.json (method {config.bank.method})")
    return config, info, plan


def load_checkpoint(folder, device: str | torch.device = "cpu") -> tuple[Config, DatasetInfo, StackedEnsemble, dict]:
    """(config, dataset info, model in eval mode, metrics) from a checkpoint folder; one-line errors."""
    path = Path(folder)
    config, info, plan = load_plan(path)
    model = build_ensemble(config, info, plan)
    try:
        state = load_file(str(path / "weights.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise SuperweightsError(f"{path / 'weights.safetensors'} cannot be read: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise SuperweightsError(f"{path / 'weights.safetensors'} does not match plan.json/config.json: {first}") from None
    metrics = _read_json(path / "metrics.json")
    return config, info, model.to(device).eval(), metrics

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

from core.bank_storage import with_legacy_storage
from core.errors import SuperweightsError
from core.plan import Plan, resolve_budget
from core.ssn import SSNPlan

from .config import Config, from_dict
from .data import DatasetInfo, dataset_info
from .methods import build_ensemble, method_of
from .model import StackedEnsemble, SuperWeightEnsemble, member_labels
from .planning import member_slots

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
    """(config, dataset info, bank plan or None for `full`) from a checkpoint folder; one-line errors.

    The plan is checked against config.json (`check_plan`): a hand-edited or mixed-up folder is refused
    here, in one line, before any model is built from it."""
    path = Path(folder)
    if not path.is_dir():
        raise SuperweightsError(f"checkpoint folder {str(path)!r} does not exist")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise SuperweightsError(f"checkpoint {str(path)!r} is missing {', '.join(missing)}")
    config_json = _read_json(path / "config.json")
    if not isinstance(config_json, dict):
        raise SuperweightsError(f"{path / 'config.json'} is malformed (not a JSON object)")
    try:
        config = from_dict(config_json)
    except SuperweightsError as e:
        raise SuperweightsError(f"{path / 'config.json'}: {e}") from None
    plan_json = _read_json(path / "plan.json")
    where = path / "plan.json"
    try:
        d = plan_json["dataset"]
        info = DatasetInfo(d["name"], d["in_channels"], tuple(d["image_size"]), d["num_classes"],
                           tuple(d["mean"]), tuple(d["std"]))
        bank = plan_json["bank"]
        plan = None if bank is None else (SSNPlan if bank.get("method") == "ssn" else Plan).from_json(bank)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise SuperweightsError(f"{where} is malformed ({_reason(e)})") from None
    plan_type = method_of(config).plan_type  # the config's method says what its plan is (None: no bank)
    if plan_json.get("method") != config.bank.method or type(plan) is not (plan_type or type(None)):
        raise SuperweightsError(f"{where} does not match config.json (method {config.bank.method})")
    check_plan(config, info, plan, bank, plan_json.get("members"), where)
    return config, info, plan


def _reason(e: Exception) -> str:
    return f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split()) or type(e).__name__


def check_plan(config: Config, info: DatasetInfo, plan: Plan | SSNPlan | None, bank_json: dict | None,
               members, where) -> None:
    """A saved plan must be the one the config trains: same members and dataset shape, the slots the config's
    members have (names, kinds, shapes, order), the budget the config resolves to, and a layout that is
    exactly what laying out these slots, groups and coefficient sets at that budget gives again.

    Learned layouts (gradient regrouping, coefficient unsharing, learned SSN groups) legitimately differ from
    the config's depth-bin plan, so they are re-laid out from their own groups; plans the config fully
    determines (depth-bin SuperWeights without unsharing, `one`/`depth` SSN groups) must equal the config's
    (`BankMethod.relayout` in `ensemble.methods`).
    """
    def mismatch(detail: str):
        return SuperweightsError(f"{where} does not match config.json: {detail}")

    names = list(config.ensemble.members)
    if members not in (member_labels(names), names):  # saved as labels: a repeated architecture is 'name#2'
        raise mismatch(f"members {members} but the config has {names}")
    if info.name != config.data.name:
        raise mismatch(f"dataset {info.name!r} but data.name = {config.data.name!r}")
    if config.data.name != "imagefolder":  # an image folder's class count needs its files: the slots check it
        expected = dataset_info(config.data)
        for key in ("in_channels", "image_size", "num_classes"):
            if getattr(info, key) != getattr(expected, key):
                raise mismatch(f"dataset {key} {getattr(info, key)} but {config.data.name} has {getattr(expected, key)}")
    elif config.data.image_size and info.image_size != (config.data.image_size,) * 2:  # 0 = native: unknown
        raise mismatch(f"image size {list(info.image_size)} but data.image_size = {config.data.image_size}")
    if plan is None:
        return
    slots = member_slots(config, info)
    if len(plan.slots) != len(slots):
        raise mismatch(f"{len(plan.slots)} slots but the config's members have {len(slots)}")
    for i, (got, want) in enumerate(zip(plan.slots, slots)):
        if got != want:
            raise mismatch(f"slot {i} is {got.name} {got.kind} {list(got.shape)} of member {got.member}, the config's "
                           f"members have {want.name} {want.kind} {list(want.shape)} of member {want.member}")
    b = config.bank
    if isinstance(plan.budget, bool) or not isinstance(plan.budget, int):
        raise mismatch(f"budget {plan.budget!r} is not a parameter count")
    resolved = resolve_budget(b.budget, slots)
    if plan.budget != resolved:
        raise mismatch(f"budget {plan.budget:,} but bank.budget = {b.budget!r} gives {resolved:,} parameters")
    if plan.max_templates != b.max_templates:
        raise mismatch(f"max_templates {plan.max_templates!r} but bank.max_templates = {b.max_templates}")
    if isinstance(plan, SSNPlan) and plan.upsample != b.upsample:
        raise mismatch(f"upsample {plan.upsample!r} but bank.upsample = {b.upsample!r}")
    try:
        again, how = method_of(config).relayout(config, info, slots, plan)
    except (SuperweightsError, TypeError, ValueError, IndexError, KeyError) as e:
        raise mismatch(f"its layout cannot be rebuilt ({_reason(e)})") from None
    difference = _first_difference(bank_json, again.to_json())
    if difference:
        raise mismatch(f"{difference} {how}")


def _first_difference(saved, expected, at: str = "bank") -> str | None:
    """Where two JSON values first differ, e.g. `bank.groups[2].blocks[0].params is 5530, expected 5430`."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        for key in [*expected, *(k for k in saved if k not in expected)]:
            if key not in saved or key not in expected:
                return f"{at}.{key} is {'missing' if key not in saved else 'unexpected'}"
            found = _first_difference(saved[key], expected[key], f"{at}.{key}")
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(expected, list):
        if len(saved) != len(expected):
            return f"{at} has {len(saved)} entries, expected {len(expected)}"
        for i, (a, b) in enumerate(zip(saved, expected)):
            found = _first_difference(a, b, f"{at}[{i}]")
            if found:
                return found
        return None
    if saved != expected or type(saved) is not type(expected):
        return f"{at} is {saved!r}, expected {expected!r}"
    return None


def saved_channels_last(folder) -> bool | None:
    """Whether a checkpoint's bank was made for channels_last convolutions (`core.bank.SuperWeightBank`): True or
    False from its weights (False for weights saved before such banks), None without a bank or readable weights
    (`load_checkpoint` says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(folder) / "weights.safetensors"), framework="pt") as f:
            keys = set(f.keys())
            if "bank.bank" not in keys:
                return None
            return "bank.channels_last" in keys and bool(f.get_tensor("bank.channels_last"))
    except Exception:  # (a missing or corrupt file: not this function's to report)
        return None


def load_checkpoint(folder, device: str | torch.device = "cpu") -> tuple[Config, DatasetInfo, StackedEnsemble, dict]:
    """(config, dataset info, model in eval mode, metrics) from a checkpoint folder; one-line errors."""
    path = Path(folder)
    config, info, plan = load_plan(path)
    try:
        model = build_ensemble(config, info, plan)
    except (RuntimeError, ValueError, IndexError, KeyError) as e:  # a plan load_plan let through but torch refuses
        raise SuperweightsError(f"{path / 'plan.json'} does not match config.json: {_reason(e)}") from None
    try:
        state = load_file(str(path / "weights.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise SuperweightsError(f"{path / 'weights.safetensors'} cannot be read: {_reason(e)}") from None
    expected = model.state_dict()
    state = with_legacy_storage(state, expected)  # (weights written before `core.bank_storage`)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            detail = f"{k} has shape {list(state[k].shape)}, the plan needs {list(expected[k].shape)}"
        else:
            detail = f"{'missing' if missing else 'unexpected'} tensor {(missing or unexpected)[0]}"
        extra = len(missing) + len(unexpected) + len(wrong) - 1
        more = f" (and {extra} more)" if extra else ""
        raise SuperweightsError(f"{path / 'weights.safetensors'} does not match plan.json/config.json: {detail}{more}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SuperweightsError(f"{path / 'weights.safetensors'} does not match plan.json/config.json: "
                                f"{_reason(e)}") from None
    metrics = _read_json(path / "metrics.json")
    return config, info, model.to(device).eval(), metrics

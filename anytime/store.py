"""A checkpoint as anytime prediction reads it: the model plus its anytime record (`anytime.record`), checked
against each other on every load; and the checks and content hashes of the files a server loads.

The training pipeline writes the record into the final checkpoint; folders without it (intermediate epoch
checkpoints, older runs, `ensemble.loop.fit` without `finish`) get it computed on first use here (FLOPs are
measured once per plan, the greedy schedule and the fitted parts need the validation split) and cached in the
folder when it is writable; a record written before the fitted parts existed gets them fitted along its own
schedule (`anytime.record.fitted_parts`), cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.checkpoint import FILES, load_checkpoint
from ensemble.config import Config
from ensemble.data import DatasetInfo, load_data
from ensemble.model import StackedEnsemble

from .record import (
    ANYTIME_FILE,
    anytime_record,
    check_record,
    exit_logits,
    fitted_parts,
    is_fitted,
    record_steps,
    write_record,
)

log = logging.getLogger("superweights.anytime")


@dataclass
class AnytimeCheckpoint:
    config: Config
    info: DatasetInfo
    model: StackedEnsemble
    metrics: dict
    record: dict

    @property
    def steps(self) -> list[tuple[int, int]]:
        return record_steps(self.record)


def load_anytime(folder, device: str | torch.device = "cpu", write: bool = True) -> AnytimeCheckpoint:
    """Checkpoint + its anytime record (computed and cached when anytime.json is missing; an older record without
    the fitted combiner, calibration and early exit gets them fitted on the validation split, and cached)."""
    config, info, model, metrics = load_checkpoint(folder, device)
    check_finite(model.state_dict(), str(Path(folder) / FILES[0]))  # evaluate, like serve, refuses NaN weights
    path = Path(folder) / ANYTIME_FILE
    record = None
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SuperweightsError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(record, dict):
            raise SuperweightsError(f"{path} is malformed (not a JSON object)")
        check_record(record, model, config, info, str(path))  # before anything is fitted along it
        if is_fitted(record):
            return AnytimeCheckpoint(config, info, model, metrics, record)
    val = _validation(config, required=record is None and config.anytime.schedule == "greedy", device=device)
    if record is None:
        record = anytime_record(model, config, info, val, device)
    elif val is not None:
        logits, labels = exit_logits(model, val, device)
        record = {**record, **fitted_parts(record_steps(record), record["step_flops"], logits, labels)}
    else:
        return AnytimeCheckpoint(config, info, model, metrics, record)  # nothing new to cache
    if write:
        try:
            write_record(folder, record)
        except OSError:
            pass  # read-only checkpoint: the record is recomputed next time
    check_record(record, model, config, info, str(path))
    return AnytimeCheckpoint(config, info, model, metrics, record)


def _validation(config: Config, required: bool, device: str | torch.device = "cpu"):
    """The validation split the fitted parts (and a greedy schedule) need; unless `required`, None when it cannot
    be loaded (e.g. a CIFAR folder missing here): the record keeps the plain combiner, without early-exit table."""
    t = config.train
    try:
        return load_data(config.data, t.seed, t.batch_size, t.eval_batch_size, device).val
    except SuperweightsError as e:
        if required:
            raise
        log.warning("anytime: no validation data to fit the combiner and the early exit on (%s)", e)
        return None


def nonfinite_tensors(state: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` that hold a NaN or an infinity."""
    return [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(state: Mapping[str, Tensor], where: str) -> None:
    """One-line error unless every floating-point tensor of `state` (a state dict, or the tensors of a
    weights.safetensors) is finite: a model with NaN/inf weights answers nothing meaningful, so it is not served."""
    bad = nonfinite_tensors(state)
    if bad:
        total = sum(1 for t in state.values() if t.is_floating_point())
        raise SuperweightsError(f"{where} holds non-finite values (NaN or infinity) in {len(bad)} of {total} "
                                f"tensors (first: {bad[0]}); such a model cannot be served or evaluated: the run that wrote it "
                                "probably diverged, retrain it (e.g. with a lower train.lr)")


def check_weights_file(folder) -> None:
    """`check_finite` on a checkpoint folder's weights.safetensors as stored (no model built: a Ray Serve
    driver checks this before any replica starts)."""
    from safetensors.torch import load_file

    path = Path(folder) / FILES[0]
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise SuperweightsError(f"{path} cannot be read: {' '.join(str(e).split())}") from None
    check_finite(state, str(path))


def file_digests(folder) -> dict[str, dict]:
    """{file name: {"sha256", "bytes"}} of a checkpoint's files (weights, plan, config, metrics, anytime record)
    that exist: what identifies a served model without naming where it lies on disk."""
    out = {}
    for name in (*FILES, ANYTIME_FILE):
        path = Path(folder) / name
        if not path.is_file():
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
        out[name] = {"sha256": h.hexdigest(), "bytes": path.stat().st_size}
    return out


def model_digest(files: Mapping[str, dict]) -> str:
    """One sha256 over the files' digests (sorted by name): changes whenever any checkpoint file does."""
    return hashlib.sha256("".join(f"{n}:{d['sha256']}\n" for n, d in sorted(files.items())).encode()).hexdigest()

"""The HTTP wire format of the anytime server: request and response schemas, parsing, client errors.

`PredictRequest` is the one request schema: the server validates bodies with it (strict: numbers only, no
NaN/inf, no unknown fields) and the OpenAPI page documents it (`BudgetBody` shows there as one object per
budget kind). `parse_request` turns a body into the inputs tensor and a typed `anytime.budget.Budget`, once;
every client mistake is an `ApiError` with a one-line message (`{"detail": message}` on the wire).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from core.errors import SuperweightsError

from .budget import KINDS, UNLIMITED, Budget


class ApiError(Exception):
    """A client mistake (or a 503): answered with `status` and `{"detail": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_json_content_type(value: str | None) -> None:
    """415 unless a request's Content-Type is `application/json` (a `charset=utf-8` parameter allowed)."""
    if value is None or not value.strip():
        raise ApiError(415, "POST /predict takes a JSON body: send the header Content-Type: application/json")
    media, *params = value.split(";")
    media = media.strip().lower()
    if media != "application/json":
        raise ApiError(415, f"unsupported Content-Type {media!r}: POST /predict takes application/json")
    for param in params:
        key, _, v = param.partition("=")
        key, v = key.strip().lower(), v.strip().strip('"').lower()
        if not key and not v:
            continue
        if key != "charset":
            raise ApiError(415, f"unsupported Content-Type parameter {key!r}: application/json takes only "
                                "charset=utf-8")
        if v not in ("utf-8", "utf8"):
            raise ApiError(415, f"unsupported charset {v!r}: JSON bodies must be UTF-8")


# -- the request ------------------------------------------------------------------------------------------

_Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _Rows(t):  # noqa: N802  (a type factory) - one nesting level; stop at the first bad element
    return Annotated[list[t], Field(fail_fast=True)]


# How messages name each budget kind's JSON form (in `anytime.budget.KINDS` order).
_FORMS = {"flops": '{"flops": F}', "ms": '{"ms": T}', "mean_flops": '{"mean_flops": F}',
          "confidence": '{"confidence": c}'}
_RANGES = {"confidence": {"minimum": 0, "maximum": 1}}  # the other kinds: a number > 0


def _one_object_per_kind(schema: dict[str, Any]) -> None:
    """Document the budget as it is accepted: exactly one of its keys, a number > 0 (confidence: in [0, 1])."""
    props = schema.pop("properties")
    schema.pop("type", None)
    schema.pop("additionalProperties", None)
    schema["oneOf"] = [
        {"title": KINDS[key].__name__, "type": "object", "additionalProperties": False, "required": [key],
         "properties": {key: {"title": prop["title"], "type": "number",
                              **_RANGES.get(key, {"exclusiveMinimum": 0}), "description": prop["description"]}}}
        for key, prop in props.items()]


class BudgetBody(BaseModel):
    """A budget: one of its keys with a number (> 0; confidence in [0, 1]), or null (instead of this object) for
    the whole schedule."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_object_per_kind)
    flops: _Number | None = Field(None, description="per-image FLOPs; at least the first step's (see GET /model)")
    ms: _Number | None = Field(None, description="deadline in milliseconds from the request's arrival")
    mean_flops: _Number | None = Field(
        None, description="per-input early exit: average FLOPs per image the thresholds were fitted for on "
                          "validation data (easy images stop early, hard ones run longer); at least the first step's")
    confidence: _Number | None = Field(
        None, description="per-input early exit: an image stops after the first step whose ensemble confidence "
                          "(max probability) is above this, in [0, 1] (1: the whole schedule, 0: the first step)")

    def to_budget(self) -> Budget:
        given = [key for key in KINDS if getattr(self, key) is not None]
        if len(given) != 1:
            keys = " or ".join(f'"{key}"' for key in KINDS)
            raise ApiError(422, f"budget must have exactly one of {keys} with a number "
                                f"(got {'both' if given else 'neither'}); use null for the whole schedule")
        try:
            return KINDS[given[0]].requested(float(getattr(self, given[0])))
        except SuperweightsError as e:
            raise ApiError(422, str(e)) from None


class PredictRequest(BaseModel):
    """The POST /predict body, validated with this schema as documented."""

    model_config = ConfigDict(extra="forbid")
    inputs: _Rows(_Rows(_Rows(_Rows(_Number)))) = Field(
        description="batch shaped (N, C, H, W), finite numbers in the dataset loader's scale ([0, 1], "
                    "not normalised: the model normalises)")
    budget: BudgetBody | None = Field(
        title="Budget",
        description="{'flops': F} per image, {'ms': T} deadline, {'mean_flops': F} or {'confidence': c} per-input "
                    "early exit, or null for the whole schedule (required)")


class PredictResponse(BaseModel):
    predictions: list[int] = Field(description="argmax class per image")
    probabilities: list[list[float]] = Field(description="(N, classes) mean softmax of the started members")
    steps: list[tuple[int, int]] = Field(description="(member index, exit index) run, in order (by the images of "
                                                     "this request that ran longest)")
    flops: int = Field(description="per-image FLOPs of the images that ran longest (never above a FLOPs budget)")
    image_steps: list[int] = Field(description="per image, the schedule steps it ran (its prefix length)")
    image_flops: list[int] = Field(description="per image, its FLOPs (never above the full schedule's)")
    confidence: float | None = Field(description="the early-exit confidence level used (mean_flops/confidence "
                                                 "budgets), else null")
    elapsed_ms: float = Field(description="server time from arrival to prediction")
    deadline_met: bool | None = Field(description="elapsed_ms <= ms for a deadline, else null")
    batch_images: int = Field(description="images in the micro-batch that served this request")


class ErrorResponse(BaseModel):
    detail: str


# -- parsing ----------------------------------------------------------------------------------------------


def parse_request(body: bytes, input_shape: tuple[int, ...], max_images: int,
                  input_range: tuple[float, float] | None) -> tuple[Tensor, Budget]:
    """(inputs float32 (N, *input_shape), budget) from a request body; ApiError for any mistake, checked in this
    order: the schema, the inputs, the budget."""
    try:
        req = PredictRequest.model_validate_json(body)
    except ValidationError as e:
        raise request_error(e, input_shape) from None
    x = decode_inputs(req.inputs, input_shape, max_images, input_range)
    return x, UNLIMITED if req.budget is None else req.budget.to_budget()


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def request_error(e: ValidationError, input_shape: tuple[int, ...]) -> ApiError:
    """The one-line client error for the first schema violation of a body."""
    err = e.errors(include_url=False)[0]
    kind, loc, msg = err["type"], tuple(err["loc"]), err["msg"]
    where = _loc(loc)
    shape = f"(N, {', '.join(map(str, input_shape))})"
    forms = list(_FORMS.values())
    if kind == "json_invalid":
        return ApiError(400, f"malformed JSON: {msg.removeprefix('Invalid JSON: ')}")
    if kind == "model_type" and not loc:
        return ApiError(422, 'the request body must be a JSON object {"inputs": ..., "budget": ...}')
    if kind == "missing" and loc == ("budget",):
        return ApiError(422, f"budget is required: {', '.join(forms)} or null for the whole schedule")
    if kind == "missing" and loc == ("inputs",):
        return ApiError(422, f"inputs is required: a batch of images as nested lists shaped {shape}")
    if kind == "extra_forbidden":
        if loc[0] == "budget":
            return ApiError(422, f"unknown budget kind {loc[-1]!r}: use {' or '.join(forms)}")
        return ApiError(422, f"unknown field {where!r}: the body has only 'inputs' and 'budget'")
    if loc and loc[0] == "inputs":
        if kind == "finite_number":
            return ApiError(422, f"{where} is {err.get('input')!r}: inputs must be finite numbers")
        if kind == "list_type":
            return ApiError(422, f"inputs must be nested lists shaped {shape}: {where} is not a list")
        return ApiError(422, f"inputs must be numbers: {where} is {err.get('input')!r}")
    if loc and loc[0] == "budget":
        if kind == "model_type":
            return ApiError(422, f"budget must be {', '.join(forms)} or null")
        return ApiError(422, f"{where} must be a finite number, got {err.get('input')!r}")
    return ApiError(422, f"{where or 'body'}: {msg}")


def decode_inputs(rows: list, input_shape: tuple[int, ...], max_images: int,
                  input_range: tuple[float, float] | None) -> Tensor:
    """Validated nested lists -> float32 tensor (N, *input_shape); ApiError unless shape, count and range fit."""
    shape = f"(N, {', '.join(map(str, input_shape))})"
    try:
        with np.errstate(over="ignore"):  # doubles beyond float32 become inf, refused below
            a = np.asarray(rows, dtype=np.float32)
    except ValueError:
        raise ApiError(422, f"inputs must be a rectangular array shaped {shape}: the nested lists have "
                            "unequal lengths") from None
    if a.ndim != 4 or a.shape[1:] != tuple(input_shape) or a.shape[0] == 0:
        raise ApiError(422, f"inputs must be shaped {shape} with N >= 1, got {tuple(a.shape)}")
    if a.shape[0] > max_images:
        raise ApiError(413, f"{a.shape[0]} images in one request; the limit is {max_images}")
    # The schema refused NaN and infinity, so the only non-finite values are finite doubles that overflowed
    # float32 to +-inf: the extremes show them (two reductions answer both this and the range check).
    amin, amax = float(a.min()), float(a.max())
    if not (math.isfinite(amin) and math.isfinite(amax)):
        raise ApiError(422, "inputs must be finite numbers within float32 range")
    if input_range is not None:
        lo, hi = input_range
        if amin < lo or amax > hi:
            raise ApiError(422, f"inputs must lie in [{lo:g}, {hi:g}] (the dataset loader's scale, before "
                                f"normalisation), got values in [{amin:g}, {amax:g}]")
    return torch.from_numpy(a)

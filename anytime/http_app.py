"""HTTP app for budgeted anytime predictions (FastAPI; uvicorn serves it locally, Ray Serve on a cluster).

`AnytimeService` holds the model (weights materialised once, at load), validates requests and
micro-batches them (`anytime.batching`); `create_app(service)` is the FastAPI app. Routes:

* `POST /predict` `{"inputs": (N, C, H, W) nested lists in the loader's scale ([0, 1], un-normalised),
  "budget": {"flops": F} | {"ms": T} | null}` -> `{"predictions", "probabilities", "steps", "flops",
  "elapsed_ms", "deadline_met", "batch_images"}`.
* `GET /health`, `GET /model` (members, exits, the schedule with cumulative FLOPs, useful budget range, the
  checkpoint's name and sha256 content hashes: never a filesystem path).

Every client mistake is a 4xx JSON `{"detail": "<one line>"}` (415 unless the body is `application/json`);
non-finite model outputs are a 503 with a message saying so (never a 500 from serialising NaN); anything
else is a 500 with a generic detail (the traceback goes to the server log, never to the client). A model
whose weights are not all finite is refused at start-up (`check_finite`). Timing: `elapsed_ms` runs from the
moment the handler starts (before the body is read) until the prediction is ready; a `{"ms": T}` budget is
a deadline on that span, `deadline_met` says whether it held.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.training import validate_device

from .batching import Item, MicroBatcher, QueueFull
from .predictor import AnytimePredictor
from .store import AnytimeCheckpoint, check_finite, file_digests, load_anytime, model_digest

log = logging.getLogger("superweights.serve")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching knobs (CLI: `superweights serve --help`)."""

    max_body_bytes: int = 8 * 2**20  # larger request bodies are refused with 413
    max_images: int = 256  # images per request
    max_batch_images: int = 64  # images per micro-batch (a larger single request runs alone)
    batch_window_ms: float = 2.0  # FLOPs/no-budget requests wait at most this long for company
    max_pending: int = 1024  # queued requests beyond this get 503
    deadline_margin_ms: float = 1.0  # kept free at the end of a deadline for the response
    deadline_safety: float = 1.25  # measured step times are multiplied by this before a step may start
    input_range: tuple[float, float] | None = (0.0, 1.0)  # loader scale; None accepts any finite value
    device: str = "cpu"

    def __post_init__(self):
        for name in ("max_body_bytes", "max_images", "max_batch_images", "max_pending"):
            if getattr(self, name) < 1:
                raise SuperweightsError(f"serve setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_window_ms", "deadline_margin_ms"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise SuperweightsError(f"serve setting {name} must be a finite number >= 0, got {v}")
        if not (math.isfinite(self.deadline_safety) and self.deadline_safety >= 1):
            raise SuperweightsError(f"serve setting deadline_safety must be >= 1, got {self.deadline_safety}")
        validate_device(self.device)
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise SuperweightsError(f"serve setting input_range must be (low, high) with low < high, "
                                    f"got {self.input_range}")


class ApiError(Exception):
    """A client mistake (or a 503): answered with `status` and `{"detail": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


NONFINITE_OUTPUT = ("the model's output for this request is not finite (NaN or infinity in the probabilities), so "
                    "no prediction can be given; the served model is numerically broken for these inputs "
                    "(reported in the server log)")

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # runs:/..., models:/..., s3://... (not C:/ or /abs/path)


def public_name(source: str) -> str:
    """What /model may say about where the model came from: a URI as given (e.g. an MLflow `runs:/<id>`), a
    folder only by its own name: never a filesystem path."""
    if _URI.match(source):
        return source
    return Path(source).expanduser().resolve().name if source else ""


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


# -- request / response schemas ---------------------------------------------------------------------------

_Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _Rows(t):  # noqa: N802  (a type factory) - one nesting level; stop at the first bad element
    return Annotated[list[t], Field(fail_fast=True)]


class _Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flops: _Number | None = None
    ms: _Number | None = None


class _Request(BaseModel):
    """What the server validates (strict: numbers only, no NaN/inf, no unknown fields)."""

    model_config = ConfigDict(extra="forbid")
    inputs: _Rows(_Rows(_Rows(_Rows(_Number))))
    budget: _Budget | None


class FlopsBudget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flops: float = Field(gt=0, description="per-image FLOPs; at least the first step's (see GET /model)")


class DeadlineBudget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ms: float = Field(gt=0, description="deadline in milliseconds from the request's arrival")


class PredictRequest(BaseModel):
    """Documentation of the request body (validated by the server as described)."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[list[list[list[float]]]] = Field(
        description="batch shaped (N, C, H, W), finite numbers in the dataset loader's scale ([0, 1], "
                    "not normalised: the model normalises)")
    budget: FlopsBudget | DeadlineBudget | None = Field(
        description="{'flops': F} per image, {'ms': T} deadline, or null for the whole schedule (required)")


class PredictResponse(BaseModel):
    predictions: list[int] = Field(description="argmax class per image")
    probabilities: list[list[float]] = Field(description="(N, classes) mean softmax of the started members")
    steps: list[tuple[int, int]] = Field(description="(member index, exit index) run, in order")
    flops: int = Field(description="per-image FLOPs spent (never above a FLOPs budget)")
    elapsed_ms: float = Field(description="server time from arrival to prediction")
    deadline_met: bool | None = Field(description="elapsed_ms <= ms for a deadline, else null")
    batch_images: int = Field(description="images in the micro-batch that served this request")


class ErrorResponse(BaseModel):
    detail: str


# -- the service ------------------------------------------------------------------------------------------


def _quantile(values, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


class ServingPredictor(AnytimePredictor):
    """`AnytimePredictor` whose step times (for deadlines) come from batch-size buckets, made conservative.

    The base class measures step times per input shape on first use; a server sees every batch size, so
    times are measured once per power-of-two bucket (at start-up up to `max_batch_images`) and a batch uses
    the bucket at or above its size, times `safety`, times `slowdown`: the `quantile` (default: the 99th
    percentile, as deadlines are judged at p99) of the recent ratios of measured to estimated run time (>= 1),
    so when the machine gets busier (other processes, concurrent requests) the estimates grow with it and
    fewer steps start. FLOPs budgets behave exactly as in the base class.
    """

    def __init__(self, model, record, device=None, safety: float = 1.25, window: int = 128,
                 quantile: float = 0.99):
        super().__init__(model, record, device)
        self.safety = safety
        self.quantile = quantile
        self.slowdown = 1.0
        self._ratios: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    @staticmethod
    def bucket(n: int) -> int:
        return 1 << max(0, n - 1).bit_length()

    def _key(self, b: int, x: Tensor) -> tuple:  # the base class's cache key for a (b, C, H, W) input
        return ((b, *x.shape[1:]), x.dtype, str(self.device))

    def calibrate(self, x: Tensor, repeats: int = 5) -> list[float]:
        b = self.bucket(x.shape[0])
        probe = x if b == x.shape[0] else torch.rand((b, *x.shape[1:]), dtype=x.dtype)
        with self._lock:
            base = super().calibrate(probe, repeats)
        return [t * self.safety * self.slowdown for t in base]

    def observe(self, x: Tensor, steps: int, elapsed_ms: float) -> None:
        """Feed back a finished run (any budget) of `steps` steps on `x` that took `elapsed_ms`."""
        base = self._times.get(self._key(self.bucket(x.shape[0]), x))
        if base is None or steps < 1:
            return  # that bucket was never measured (a large single request): nothing to compare with
        self._ratios.append(elapsed_ms / max(sum(base[:steps]), 1e-6))
        self.slowdown = max(1.0, _quantile(self._ratios, self.quantile))


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class AnytimeService:
    """The model behind the HTTP app: validation, micro-batching, predictions. Framework-free except for
    `create_app`; Ray Serve replicas build one each."""

    def __init__(self, ckpt: AnytimeCheckpoint, settings: ServeSettings | None = None, source: str = "",
                 files: dict[str, dict] | None = None, where: str | None = None):
        """`source`: where the model came from, reported by /model only as `public_name(source)`; `files`: the
        checkpoint's `file_digests`; `where`: what a start-up error names (default: the public name)."""
        self.settings = settings or ServeSettings()
        self.source = public_name(source)
        self.files = dict(files or {})
        where = where or self.source or "the model"
        check_finite(ckpt.model.state_dict(), where)  # refused before anything is built from it
        self.info = ckpt.info
        self.names = list(ckpt.model.names)
        self.record = ckpt.record
        self.method = ckpt.config.bank.method
        self.input_shape = (ckpt.info.in_channels, *ckpt.info.image_size)
        self.predictor = ServingPredictor(ckpt.model, ckpt.record, self.settings.device,
                                          safety=self.settings.deadline_safety)
        check_finite(self.predictor.model.state_dict(), f"{where} (materialised weights)")
        self.nonfinite_outputs = 0  # requests answered 503 because the model's probabilities were not finite
        s = self.settings
        self._arriving = 0  # requests being read/parsed (event-loop thread only)
        self.batcher = MicroBatcher(self._run_batch, window_ms=s.batch_window_ms, max_images=s.max_batch_images,
                                    max_pending=s.max_pending, arriving=lambda: self._arriving)
        self.started = time.time()
        self._after: deque[float] = deque(maxlen=128)  # ms from a batch's end to its handlers resuming
        self._warm_up()
        self._model_info = self._describe()

    @classmethod
    def from_folder(cls, folder, settings: ServeSettings | None = None, source: str | None = None) -> AnytimeService:
        settings = settings or ServeSettings()
        ckpt = load_anytime(folder, settings.device)
        return cls(ckpt, settings, source or str(folder), files=file_digests(folder),
                   where=str(Path(folder) / "weights.safetensors"))

    def _warm_up(self) -> None:
        """First-call overheads and step times for every batch bucket up to `max_batch_images`."""
        x = torch.rand(1, *self.input_shape)
        self.predictor.predict(x)
        b = 1
        while b <= max(1, self.settings.max_batch_images):
            self.predictor.calibrate(torch.rand(b, *self.input_shape))
            b *= 2

    # -- /model ------------------------------------------------------------------------------------------

    def _describe(self) -> dict:
        p, rec = self.predictor, self.record
        times = p.calibrate(torch.rand(1, *self.input_shape))  # cached; safety included
        schedule = []
        for i, ((m, k), f, c) in enumerate(zip(p.steps, p.step_flops, p.cumulative_flops)):
            schedule.append({"step": i + 1, "member": m, "member_name": self.names[m], "exit": k,
                             "stage": rec["exit_stages"][m][k], "flops": f, "cumulative_flops": c,
                             "estimated_ms": round(sum(times[: i + 1]), 4)})
        margin = self.settings.deadline_margin_ms
        return {
            "source": self.source,  # an MLflow URI as given, or the checkpoint folder's name (never a path)
            "checkpoint": {"sha256": model_digest(self.files) if self.files else None, "files": self.files},
            "method": self.method,
            "dataset": self.info.name,
            "input_shape": list(self.input_shape),
            "input_range": list(self.settings.input_range) if self.settings.input_range else None,
            "num_classes": self.info.num_classes,
            "members": self.names,
            "exits": [{"member": n, "num_exits": e, "exit_stages": list(rec["exit_stages"][m])}
                      for m, (n, e) in enumerate(zip(self.names, rec["num_exits"]))],
            "schedule_kind": rec["schedule"]["kind"],
            "schedule": schedule,
            "budget": {
                "flops": {"min": p.cumulative_flops[0], "max": p.cumulative_flops[-1],
                          "note": "per image; below min is an error, above max runs the whole schedule"},
                "ms": {"min": round(times[0] + margin, 3), "max": round(sum(times) + margin, 3),
                       "note": "estimates for one image on an idle server: below min only the first step runs "
                               "(and the deadline may be missed), above max every step runs"},
            },
            "limits": {"max_body_bytes": self.settings.max_body_bytes, "max_images": self.settings.max_images,
                       "max_batch_images": self.settings.max_batch_images,
                       "batch_window_ms": self.settings.batch_window_ms},
        }

    def model_info(self) -> dict:
        return self._model_info

    def health(self) -> dict:
        return {"status": "ok", "members": len(self.names), "uptime_s": round(time.time() - self.started, 1),
                "pending": self.batcher.pending, "batches": self.batcher.batches,
                "requests": self.batcher.requests, "nonfinite_outputs": self.nonfinite_outputs,
                "slowdown": round(self.predictor.slowdown, 3),
                "deadline_margin_ms": round(self.margin_ms, 3)}

    # -- /predict ----------------------------------------------------------------------------------------

    def parse(self, body: bytes) -> tuple[Tensor, tuple[str | None, float | None]]:
        """(inputs float32 (N, C, H, W), budget key) from a request body; ApiError for any mistake."""
        try:
            req = _Request.model_validate_json(body)
        except ValidationError as e:
            raise self._validation_error(e) from None
        x = self._inputs(req.inputs)
        return x, self._budget(req.budget)

    def _validation_error(self, e: ValidationError) -> ApiError:
        err = e.errors(include_url=False)[0]
        kind, loc, msg = err["type"], tuple(err["loc"]), err["msg"]
        where = _loc(loc)
        shape = f"(N, {', '.join(map(str, self.input_shape))})"
        if kind == "json_invalid":
            return ApiError(400, f"malformed JSON: {msg.removeprefix('Invalid JSON: ')}")
        if kind == "model_type" and not loc:
            return ApiError(422, 'the request body must be a JSON object {"inputs": ..., "budget": ...}')
        if kind == "missing" and loc == ("budget",):
            return ApiError(422, 'budget is required: {"flops": F}, {"ms": T} or null for the whole schedule')
        if kind == "missing" and loc == ("inputs",):
            return ApiError(422, f"inputs is required: a batch of images as nested lists shaped {shape}")
        if kind == "extra_forbidden":
            if loc[0] == "budget":
                return ApiError(422, f"unknown budget kind {loc[-1]!r}: use {{\"flops\": F}} or {{\"ms\": T}}")
            return ApiError(422, f"unknown field {where!r}: the body has only 'inputs' and 'budget'")
        if loc and loc[0] == "inputs":
            if kind == "finite_number":
                return ApiError(422, f"{where} is {err.get('input')!r}: inputs must be finite numbers")
            if kind == "list_type":
                return ApiError(422, f"inputs must be nested lists shaped {shape}: {where} is not a list")
            return ApiError(422, f"inputs must be numbers: {where} is {err.get('input')!r}")
        if loc and loc[0] == "budget":
            if kind == "model_type":
                return ApiError(422, 'budget must be {"flops": F}, {"ms": T} or null')
            return ApiError(422, f"{where} must be a finite number, got {err.get('input')!r}")
        return ApiError(422, f"{where or 'body'}: {msg}")

    def _inputs(self, rows: list) -> Tensor:
        shape = f"(N, {', '.join(map(str, self.input_shape))})"
        try:
            with np.errstate(over="ignore"):  # doubles beyond float32 become inf, refused below
                a = np.asarray(rows, dtype=np.float32)
        except ValueError:
            raise ApiError(422, f"inputs must be a rectangular array shaped {shape}: the nested lists have "
                                "unequal lengths") from None
        if a.ndim != 4 or a.shape[1:] != self.input_shape or a.shape[0] == 0:
            raise ApiError(422, f"inputs must be shaped {shape} with N >= 1, got {tuple(a.shape)}")
        if a.shape[0] > self.settings.max_images:
            raise ApiError(413, f"{a.shape[0]} images in one request; the limit is {self.settings.max_images}")
        if not np.isfinite(a).all():  # finite doubles can overflow float32
            raise ApiError(422, "inputs must be finite numbers within float32 range")
        if self.settings.input_range is not None:
            lo, hi = self.settings.input_range
            amin, amax = float(a.min()), float(a.max())
            if amin < lo or amax > hi:
                raise ApiError(422, f"inputs must lie in [{lo:g}, {hi:g}] (the dataset loader's scale, before "
                                    f"normalisation), got values in [{amin:g}, {amax:g}]")
        return torch.from_numpy(a)

    def _budget(self, b: _Budget | None) -> tuple[str | None, float | None]:
        if b is None:
            return (None, None)
        given = [k for k in ("flops", "ms") if getattr(b, k) is not None]
        if len(given) != 1:
            raise ApiError(422, 'budget must have exactly one of "flops" or "ms" with a number '
                                f"(got {'both' if given else 'neither'}); use null for the whole schedule")
        kind = given[0]
        value = float(getattr(b, kind))
        if value <= 0:
            unit = "FLOPs per image" if kind == "flops" else "milliseconds"
            raise ApiError(422, f"budget.{kind} must be > 0 {unit}, got {value:g}")
        if kind == "flops":
            try:
                self.predictor.prefix_for_budget(value)
            except SuperweightsError as e:
                raise ApiError(422, str(e)) from None
        return (kind, value)

    def _run_batch(self, key: tuple, items: list[Item]) -> list[tuple[dict, float]]:
        """Worker thread: one predictor call for the batch, split per request; (response part, finish time)."""
        kind, value = key
        x = items[0].x if len(items) == 1 else torch.cat([it.x for it in items])
        if kind == "ms":
            waited = (time.perf_counter() - min(it.t0 for it in items)) * 1e3
            pred = self.predictor.predict(x, deadline_ms=value - waited - self.margin_ms)
        else:
            pred = self.predictor.predict(x, budget_flops=value)
        self.predictor.observe(x, len(pred.steps), pred.elapsed_ms)
        probs = pred.probs.float().cpu()
        finite = torch.isfinite(probs).all(-1)  # per image: eval-mode rows are independent of each other
        steps = [list(s) for s in pred.steps]
        out, start = [], 0
        for it in items:
            rows = slice(start, start + len(it.x))
            start += len(it.x)
            if not bool(finite[rows].all()):
                self._nonfinite(key, int((~finite[rows]).sum()), len(it.x), steps)
                out.append(ApiError(503, NONFINITE_OUTPUT))
                continue
            p = probs[rows]
            out.append({"predictions": p.argmax(-1).tolist(), "probabilities": p.tolist(), "steps": steps,
                        "flops": int(pred.flops), "batch_images": len(x)})
        done = time.perf_counter()
        return [(o, done) for o in out]

    def _nonfinite(self, key: tuple, bad: int, images: int, steps: list) -> None:
        """Count a request answered 503 for non-finite probabilities; log the first one (not every request)."""
        self.nonfinite_outputs += 1
        if self.nonfinite_outputs == 1:
            log.error("model %s produced non-finite probabilities (NaN or infinity) for %d of %d images of a "
                      "request (budget %s, steps %s); such requests are answered 503 (logged once; GET /health "
                      "counts them as nonfinite_outputs)", self.source, bad, images, key, steps)

    @property
    def margin_ms(self) -> float:
        """Time kept free at the end of a deadline: the configured margin plus the 99th percentile of the recent
        delays between a batch finishing and its requests' handlers resuming (grows when the server is busy)."""
        return self.settings.deadline_margin_ms + _quantile(tuple(self._after), self.predictor.quantile)

    async def predict(self, x: Tensor, key: tuple, t0: float) -> dict:
        """Queue one validated request; the response dict (elapsed and deadline filled in)."""
        kind, value = key
        try:
            out, done = await self.batcher.submit(key, x, t0, wait=kind != "ms")
        except QueueFull as e:
            raise ApiError(503, f"server busy ({e}); retry later") from None
        if isinstance(out, ApiError):  # non-finite model output (`_run_batch`)
            raise out
        now = time.perf_counter()
        self._after.append((now - done) * 1e3)
        elapsed = (now - t0) * 1e3
        return {**out, "elapsed_ms": round(elapsed, 3), "deadline_met": (elapsed <= value) if kind == "ms" else None}

    async def predict_request(self, read: Callable[[], Awaitable[bytes]], t0: float) -> dict:
        """Read (`await read()`), parse and predict one request; ApiError for client mistakes. While it is read
        and parsed the request counts as arriving: the batcher waits for company only when some is on its way."""
        self._arriving += 1
        try:
            body = await read()
            x, key = (await run_in_threadpool(self.parse, body)) if len(body) > 2**16 else self.parse(body)
        finally:
            self._arriving -= 1
        return await self.predict(x, key, t0)

    async def predict_body(self, body: bytes, t0: float | None = None) -> dict:
        """`predict_request` for a body already read (Ray Serve deployment handles)."""
        async def read() -> bytes:
            return body

        return await self.predict_request(read, time.perf_counter() if t0 is None else t0)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared!r}") from None
        if n > limit:
            raise ApiError(413, f"request body of {n:,} bytes is over the limit of {limit:,} bytes; "
                                "send fewer images per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes; send fewer images per request")
        chunks.append(chunk)
    return b"".join(chunks)


# -- the app ----------------------------------------------------------------------------------------------

DESCRIPTION = """Anytime predictions of a SuperWeight ensemble with early exits under a budget.

`POST /predict` runs the longest prefix of the model's schedule (see `GET /model`) that fits the budget:
`{"flops": F}` per image (never exceeded; below the first step's FLOPs is a 422), `{"ms": T}` a deadline from
the request's arrival (a step starts only if its measured time fits; the first step always runs) or `null`
(the whole schedule). The body must be `Content-Type: application/json`. Errors are JSON `{"detail": "..."}`:
400 malformed JSON, 413 too large, 415 not application/json, 422 invalid, 503 busy or a non-finite model
output."""


def create_app(service: AnytimeService) -> FastAPI:
    """The FastAPI app around `service` (uvicorn serves it as is; `ray_jobs.serve` wraps it in Ray Serve)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.batcher.aclose()

    app = FastAPI(title="superweights anytime predictor", version="1", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.service = service
    errors = {c: {"model": ErrorResponse} for c in (400, 413, 415, 422, 503)}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"detail": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.get("/health", summary="liveness and queue statistics")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/model", summary="members, exits, schedule with cumulative FLOPs, useful budget range, checkpoint hashes")
    async def model() -> dict[str, Any]:
        return service.model_info()

    @app.post("/predict", response_model=PredictResponse, responses=errors,
              summary="anytime prediction under a FLOPs budget or a deadline")
    async def predict(request: Request):
        t0 = time.perf_counter()
        check_json_content_type(request.headers.get("content-type"))  # 415 before the body is read
        try:
            return JSONResponse(await service.predict_request(
                lambda: read_body(request, service.settings.max_body_bytes), t0))
        except ApiError:
            raise
        except Exception:  # answered here, not by the server-error middleware, so the connection stays usable
            log.exception("internal error on POST /predict")
            return JSONResponse({"detail": "internal server error"}, status_code=500)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            req = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(req.pop("$defs", {}))
            components["PredictRequest"] = req
            schema["paths"]["/predict"]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


# -- running it ------------------------------------------------------------------------------------------


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                    log_level: str = "warning") -> Iterator[str]:
    """Run `app` with uvicorn in a daemon thread on `host:port` (0 = an ephemeral port); yields the base URL
    and stops the server on exit. Used by tests and benchmarks."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


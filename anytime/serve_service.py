"""The model behind the HTTP app: `AnytimeService` validates requests, micro-batches them and predicts.

It holds the model (weights materialised once, at load, and refused unless finite: `check_finite`) and a
`ServingPredictor`; `parse` turns a body into inputs and a typed `Budget` (`anytime.serve_schemas`), which
travels through the micro-batcher (`anytime.batching`, requests with equal budgets share one call) to the
predictor. Framework-free: `anytime.http_app.create_app(service)` is the FastAPI app (uvicorn serves it
locally; Ray Serve replicas build one service each). Timing: `elapsed_ms` runs from the moment the handler
starts (before the body is read) until the prediction is ready; a `{"ms": T}` budget is a deadline on that
span, `deadline_met` says whether it held.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi.concurrency import run_in_threadpool
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.config import ServeConfig
from ensemble.config_sections import SERVE_MEMORY_FORMATS
from ensemble.training import validate_device

from .batching import Item, MicroBatcher, QueueFull
from .budget import Budget
from .serve_schemas import ApiError, parse_request
from .serving_predictor import ServingPredictor, quantile_of
from .store import AnytimeCheckpoint, check_finite, file_digests, load_anytime, model_digest

log = logging.getLogger("superweights.serve")


@dataclass(frozen=True)
class ServeSettings:
    """The service's limits and batching knobs: a view of the config's `[serve]` section (`from_config`, the one
    place it is built from a config; defaults and meanings: `ensemble.config.ServeConfig`; CLI: `superweights
    serve --help`). Host, port, threads and the Ray Serve knobs stay in the config: they are not the service's."""

    max_body_bytes: int = int(ServeConfig.max_body_mb * 2**20)  # larger request bodies are refused with 413
    max_images: int = ServeConfig.max_images
    max_batch_images: int = ServeConfig.max_batch_images
    batch_window_ms: float = ServeConfig.batch_window_ms
    max_pending: int = ServeConfig.max_pending
    deadline_margin_ms: float = ServeConfig.deadline_margin_ms
    deadline_safety: float = ServeConfig.deadline_safety
    input_range: tuple[float, float] | None = (0.0, 1.0)  # loader scale; None accepts any finite value
    device: str = ServeConfig.device
    memory_format: str = ServeConfig.memory_format  # conv weights' layout: auto | contiguous | channels_last

    @classmethod
    def from_config(cls, serve: ServeConfig, device: str | None = None) -> ServeSettings:
        """From `config.serve` (MiB -> bytes, an empty input_range -> any value); `device` overrides
        `serve.device` (e.g. after resolving `cuda` to `cuda:0`)."""
        return cls(max_body_bytes=int(serve.max_body_mb * 2**20), max_images=serve.max_images,
                   max_batch_images=serve.max_batch_images, batch_window_ms=serve.batch_window_ms,
                   max_pending=serve.max_pending, deadline_margin_ms=serve.deadline_margin_ms,
                   deadline_safety=serve.deadline_safety,
                   input_range=(serve.input_range[0], serve.input_range[1]) if serve.input_range else None,
                   device=device or serve.device, memory_format=serve.memory_format)

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
        if self.memory_format not in SERVE_MEMORY_FORMATS:
            raise SuperweightsError(f"serve setting memory_format must be one of {', '.join(SERVE_MEMORY_FORMATS)}, "
                                    f"got {self.memory_format!r}")
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise SuperweightsError(f"serve setting input_range must be (low, high) with low < high, "
                                    f"got {self.input_range}")


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


class AnytimeService:
    """Validation, micro-batching and predictions of one model (see the module docstring)."""

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
                                          safety=self.settings.deadline_safety,
                                          memory_format=self.settings.memory_format)
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

    # -- /model and /health ------------------------------------------------------------------------------

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
                "mean_flops": ({"min": p.table[0]["bound"], "max": p.table[-1]["bound"],
                                "note": "average per image (per-input early exit at the level fitted on validation "
                                        "data); below min is an error, above max runs the whole schedule"}
                               if p.table else None),
                "confidence": {"min": 0, "max": 1, "score": p.score,
                               "note": "per-input early exit: an image stops once its confidence is above this"},
            },
            "memory_format": {"setting": p.memory_format,
                              "by_batch_size": {str(b): f for b, f in sorted(p.formats.items())},
                              "note": "layout of the conv weights that runs a batch of up to that many images "
                                      "(auto: the faster one measured at start-up)"},
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

    def parse(self, body: bytes) -> tuple[Tensor, Budget]:
        """(inputs float32 (N, C, H, W), budget) from a request body; ApiError for any mistake (a FLOPs budget
        below the first step's cost included)."""
        s = self.settings
        x, budget = parse_request(body, self.input_shape, s.max_images, s.input_range)
        try:
            self.predictor.check_budget(budget)
        except SuperweightsError as e:
            raise ApiError(422, str(e)) from None
        return x, budget

    def _run_batch(self, budget: Budget, items: list[Item]) -> list[tuple[dict, float]]:
        """Worker thread: one predictor call for the batch, split per request; (response part, finish time).
        A deadline counts from the oldest request's arrival and keeps `margin_ms` free for the response."""
        x = items[0].x if len(items) == 1 else torch.cat([it.x for it in items])
        if budget.deadline_ms is not None:
            budget = budget.after((time.perf_counter() - min(it.t0 for it in items)) * 1e3 + self.margin_ms)
        pred = self.predictor.predict(x, budget=budget)
        if pred.level is None:  # early-exit runs shrink their batch: not comparable with the step times
            self.predictor.observe(x, len(pred.steps), pred.elapsed_ms)
        probs = pred.probs
        if probs.dtype != torch.float32 or probs.device.type != "cpu":
            probs = probs.float().cpu()
        # One torch call for the whole batch (tolist), the rest on plain lists: each torch call costs a few
        # microseconds hot and tens of them on a busy machine (cold caches), several per request added up to
        # ~0.2 ms of a lone request's overhead (issue 15). A row's sum is finite iff all its values are
        # (probabilities cannot overflow a sum), and `row.index(max(row))` is torch.argmax's first maximum.
        # Rows are independent in eval mode, so a non-finite row fails only the request that owns it.
        values = probs.tolist()
        finite = [math.isfinite(sum(row)) for row in values]
        cum = self.predictor.cumulative_flops
        out, start = [], 0
        for it in items:
            stop = start + it.images
            rows, start = slice(start, stop), stop
            n = max(pred.image_steps[rows])  # this request's longest-running image
            steps = [list(s) for s in self.predictor.steps[:n]]
            if not all(finite[rows]):
                self._nonfinite(budget, finite[rows].count(False), it.images, steps)
                out.append(ApiError(503, NONFINITE_OUTPUT))
                continue
            mine = values[rows]
            out.append({"predictions": [row.index(max(row)) for row in mine], "probabilities": mine, "steps": steps,
                        "flops": int(cum[n - 1]), "image_steps": pred.image_steps[rows],
                        "image_flops": pred.image_flops[rows], "confidence": pred.level, "batch_images": len(x)})
        done = time.perf_counter()
        return [(o, done) for o in out]

    def _nonfinite(self, budget: Budget, bad: int, images: int, steps: list) -> None:
        """Count a request answered 503 for non-finite probabilities; log the first one (not every request)."""
        self.nonfinite_outputs += 1
        if self.nonfinite_outputs == 1:
            log.error("model %s produced non-finite probabilities (NaN or infinity) for %d of %d images of a "
                      "request (budget %s, steps %s); such requests are answered 503 (logged once; GET /health "
                      "counts them as nonfinite_outputs)", self.source, bad, images, budget, steps)

    @property
    def margin_ms(self) -> float:
        """Time kept free at the end of a deadline: the configured margin plus the 99th percentile of the recent
        delays between a batch finishing and its requests' handlers resuming (grows when the server is busy)."""
        return self.settings.deadline_margin_ms + quantile_of(tuple(self._after), self.predictor.quantile)

    async def predict(self, x: Tensor, budget: Budget, t0: float) -> dict:
        """Queue one validated request; the response dict (elapsed and deadline filled in)."""
        deadline = budget.deadline_ms
        try:
            out, done = await self.batcher.submit(budget, x, t0, wait=deadline is None)
        except QueueFull as e:
            raise ApiError(503, f"server busy ({e}); retry later") from None
        if isinstance(out, ApiError):  # non-finite model output (`_run_batch`)
            raise out
        now = time.perf_counter()
        self._after.append((now - done) * 1e3)
        elapsed = (now - t0) * 1e3
        return {**out, "elapsed_ms": round(elapsed, 3), "deadline_met": None if deadline is None else elapsed <= deadline}

    async def predict_request(self, read: Callable[[], Awaitable[bytes]], t0: float) -> dict:
        """Read (`await read()`), parse and predict one request; ApiError for client mistakes. While it is read
        and parsed the request counts as arriving: the batcher waits for company only when some is on its way."""
        self._arriving += 1
        try:
            body = await read()
            x, budget = (await run_in_threadpool(self.parse, body)) if len(body) > 2**16 else self.parse(body)
        except BaseException:
            self._arriving -= 1
            self.batcher.nudge()  # a queued request may be waiting for this one, which will not come
            raise
        self._arriving -= 1
        return await self.predict(x, budget, t0)

    async def predict_body(self, body: bytes, t0: float | None = None) -> dict:
        """`predict_request` for a body already read (Ray Serve deployment handles)."""
        async def read() -> bytes:
            return body

        return await self.predict_request(read, time.perf_counter() if t0 is None else t0)

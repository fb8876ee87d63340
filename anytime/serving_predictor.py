"""The predictor a server runs: `AnytimePredictor` with step times per batch-size bucket, made conservative,
and the faster memory layout of the conv weights per bucket."""

from __future__ import annotations

import copy
import threading
from collections import deque

import torch
from torch import Tensor

from core.errors import SuperweightsError
from ensemble.config_sections import SERVE_MEMORY_FORMATS as MEMORY_FORMATS
from ensemble.exits import as_steps

from .predictor import AnytimePredictor

# `serve.memory_format`: the conv weights' layout. Which is faster depends on the model, the batch size and the
# device (one CPU core, BENCHMARKS.md "Serving: conv-weight layout": `make run`'s digits members answer one image
# in 6.3 ms row-major and 3.8 ms channels_last, because PyTorch sends a single small row-major image through its
# slower im2col convolution, yet channels_last is 2-7% slower from 4 images on; 32x32 WRN, ResNet and
# MobileNetV2 members are 12-23% faster channels_last at every batch size), so "auto" measures both.
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def quantile_of(values, q: float) -> float:
    """The `q` quantile of `values` (nearest rank, 0.0 for none)."""
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

    `memory_format`: "contiguous" or "channels_last" holds the materialised conv weights in that layout;
    "auto" holds both (the conv weights twice, every other tensor once; a model without convs holds only
    "contiguous", as there is nothing to choose) and, when a bucket is measured, keeps the layout whose
    steps took less time in all (`formats`: bucket -> layout), which then runs every batch of that bucket; a
    bucket never measured uses the largest measured one's. The layouts give the same probabilities up to
    float rounding (different conv algorithms), as batch sizes do.
    """

    def __init__(self, model, record, device=None, safety: float = 1.25, window: int = 128,
                 quantile: float = 0.99, memory_format: str = "auto"):
        if memory_format not in MEMORY_FORMATS:
            raise SuperweightsError(f"serve memory_format must be one of {', '.join(MEMORY_FORMATS)}, "
                                    f"got {memory_format!r}")
        super().__init__(model, record, device)
        self.memory_format = memory_format
        convs = any(t.ndim == 4 for t in self.model.parameters())
        layouts = [memory_format] if memory_format != "auto" else list(LAYOUTS) if convs else ["contiguous"]
        self.model.to(memory_format=LAYOUTS[layouts[0]])  # 4-d tensors only: the conv weights
        self.layout_models = {layouts[0]: self.model}  # the first is `model`, the others copies of it
        for name in layouts[1:]:
            # only the conv weights are copied: every other tensor (BatchNorm, linear, buffers) is shared
            shared = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()] if t.ndim != 4}
            self.layout_models[name] = copy.deepcopy(self.model, shared).to(memory_format=LAYOUTS[name])
        self.layouts = {name: self.members if m is self.model else [as_steps(x) for x in m.members]
                        for name, m in self.layout_models.items()}
        self.formats: dict[int, str] = {}  # bucket -> the layout that runs it (set when the bucket is measured)
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

    def format_for(self, batch: int) -> str:
        """The layout that runs a batch of `batch` images: its bucket's, else the nearest measured bucket's below
        it (a request larger than the largest one measured), else above it; the first layout before any."""
        b = self.bucket(batch)
        if b in self.formats:
            return self.formats[b]
        if not self.formats:
            return next(iter(self.layouts))
        below = [k for k in self.formats if k <= b]
        return self.formats[max(below) if below else min(self.formats)]

    def layout_summary(self) -> str:
        """Which layout runs which batch sizes, e.g. `channels_last for 1 image, contiguous for 2-64 images`."""
        groups: list[list] = []  # [layout, first batch size, last batch size]
        low = 1
        for b, name in sorted(self.formats.items()):
            if groups and groups[-1][0] == name:
                groups[-1][2] = b
            else:
                groups.append([name, low, b])
            low = b + 1
        if not groups:
            return f"{next(iter(self.layouts))} (no batch size measured yet)"
        return ", ".join(f"{name} for {a if a == b else f'{a}-{b}'} image{'s' if b > 1 else ''}"
                         for name, a, b in groups)

    def _members_for(self, batch: int) -> list:
        return self.layouts[self.format_for(batch)]

    @torch.no_grad()
    def calibrate(self, x: Tensor, repeats: int = 5) -> list[float]:
        b = self.bucket(x.shape[0])
        key = self._key(b, x)
        with self._lock:
            if key not in self._times:
                probe = x if b == x.shape[0] else torch.rand((b, *x.shape[1:]), dtype=x.dtype)
                measured = dict(zip(self.layouts, self._measure(probe, repeats, list(self.layouts.values()))))
                best = min(measured, key=lambda name: sum(measured[name]))
                self._times[key], self.formats[b] = measured[best], best
            base = self._times[key]
        return [t * self.safety * self.slowdown for t in base]

    def observe(self, x: Tensor, steps: int, elapsed_ms: float) -> None:
        """Feed back a finished run (any budget) of `steps` steps on `x` that took `elapsed_ms`."""
        base = self._times.get(self._key(self.bucket(x.shape[0]), x))
        if base is None or steps < 1:
            return  # that bucket was never measured (a large single request): nothing to compare with
        self._ratios.append(elapsed_ms / max(sum(base[:steps]), 1e-6))
        self.slowdown = max(1.0, quantile_of(self._ratios, self.quantile))

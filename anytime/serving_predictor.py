"""The predictor a server runs: `AnytimePredictor` with step times per batch-size bucket, made conservative."""

from __future__ import annotations

import threading
from collections import deque

import torch
from torch import Tensor

from .predictor import AnytimePredictor


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
        self.slowdown = max(1.0, quantile_of(self._ratios, self.quantile))

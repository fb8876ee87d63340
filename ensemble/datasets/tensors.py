"""Whole-split image operations on uint8 tensors: resizing to `data.image_size` and channel statistics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 4096  # images per interpolation call: bounds the float32 copy (4096 x 3 x 32 x 32 = 50 MB)


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8; `size` 0 (native) or the current size is a no-op.

    Shrinking uses area interpolation (each output pixel is the mean of the input pixels it covers: no aliasing,
    the per-channel mean is kept, as torchvision/PIL `BOX`); growing uses antialiased bilinear interpolation.
    """
    n, _, h, w = x.shape
    if size == 0 or (h, w) == (size, size):
        return x
    mode = "area" if size <= min(h, w) else "bilinear"
    extra = {} if mode == "area" else {"align_corners": False, "antialias": True}
    src = torch.from_numpy(np.ascontiguousarray(x))
    out = torch.empty((n, x.shape[1], size, size), dtype=torch.uint8)
    for lo in range(0, n, _CHUNK):
        part = F.interpolate(src[lo : lo + _CHUNK].float(), size=(size, size), mode=mode, **extra)
        out[lo : lo + _CHUNK] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out.numpy()


def channel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel population mean and std of uint8 images (N, C, H, W) divided by `scale`, exactly (from each
    channel's 256-bin histogram, so no float sums over millions of pixels)."""
    values = np.arange(256, dtype=np.float64) / scale
    t = torch.from_numpy(np.ascontiguousarray(x))
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(t[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        total = hist.sum()
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        means.append(round(mean, 6))
        stds.append(round(max(var, 0.0) ** 0.5, 6))
    return tuple(means), tuple(stds)

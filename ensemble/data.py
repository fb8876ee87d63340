"""Datasets as in-memory uint8 tensors and seeded, shardable batch loaders.

Loaders yield un-normalised float32 images in [0, 1]; the model applies `DatasetInfo.mean/std`, so the
same loader serves every member and the normalisation travels with the saved model. `data.image_size`
(area downsampling on tensors) and `data.train_per_class` apply to every dataset. The readers live in
`ensemble.datasets` (one file per format); image trees are decoded once and cached (`datasets.cache`).
Nothing here touches the network unless `data.download=true` is asked for (CIFAR only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import SuperweightsError
from ensemble.config import DataConfig

from .datasets import cache
from .datasets.cifar import _CIFAR_PICKLE_GLOBALS, CIFAR, CIFAR_MD5, load_cifar  # noqa: F401 (re-exported)
from .datasets.idx import load_fashion_mnist
from .datasets.images import IMAGE_SUFFIXES, decode, open_source  # noqa: F401 (re-exported)
from .datasets.loader import SUBSET_STREAM, Loader, derived_seed
from .datasets.tensors import channel_stats, resize_images

DATASETS = ("digits", "cifar10", "cifar100", "fashion-mnist", "imagefolder")

# Channel statistics of each dataset's training images at native size, in [0, 1] scale (population std).
# Whole sklearn digits set (1,797 images, all 64 pixels pooled) scaled by 1/16:
#   x = load_digits().images.astype(np.float64) / 16; x.mean(), x.std()
DIGITS_MEAN = (0.30526028624095713,)
DIGITS_STD = (0.3760492217920148,)
# The std is the true per-pixel one, not the often-copied (0.2023, 0.1994, 0.2010), which is a per-image
# average and under-states the spread.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# The 60,000 training images of train-images-idx3-ubyte / 255 (a test recomputes them from ../shared/data).
FASHION_MNIST_MEAN = (0.2860405969887955,)
FASHION_MNIST_STD = (0.35302424451492254,)

# name -> (channels, native (H, W), classes, mean, std). An image folder's are measured from its images.
# At a smaller data.image_size the mean is unchanged (area interpolation averages) and the std a little
# smaller than these; the model's normalisation does not need to be exact, so the constants are kept there.
_KNOWN = {
    "digits": (1, (8, 8), 10, DIGITS_MEAN, DIGITS_STD),
    "cifar10": (3, (32, 32), 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (3, (32, 32), 100, CIFAR100_MEAN, CIFAR100_STD),
    "fashion-mnist": (1, (28, 28), 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: tuple[int, int]  # (H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, applied by the model
    std: tuple[float, ...]


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise SuperweightsError(f"unknown dataset data.name={name!r}; valid names: {', '.join(DATASETS)}")


def _abs(root: str) -> Path:
    """A relative data.root is taken from the current directory (the repo root under `make`)."""
    return Path(root).expanduser().resolve()


def absolute_paths(cfg: DataConfig) -> DataConfig:
    """data.root and data.cache_dir resolved against this process's current directory. Call it where the user
    runs the command: Ray Train workers run in a folder of their own, where a relative path means nothing."""
    import dataclasses

    cache_dir = str(Path(cfg.cache_dir).expanduser().absolute()) if cfg.cache_dir else ""
    return dataclasses.replace(cfg, root=str(_abs(cfg.root)), cache_dir=cache_dir)


def _check_image_size(size: int) -> None:
    if size < 0:
        raise SuperweightsError(f"data.image_size must be >= 0 (0 = native size), got {size}")


@dataclass(frozen=True)
class _Images:
    """An image folder/archive at the configured size: what `dataset_info` and `load_data` both need."""

    info: DatasetInfo
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


_memo: dict[tuple, _Images] = {}  # the last image source this process read (dataset_info, then load_data)


def _image_tree(cfg: DataConfig) -> _Images:
    """Decode (or load from the cache) the image tree, resize it to data.image_size, measure its statistics."""
    source = open_source(_abs(cfg.root), cfg.train_split, cfg.test_split)
    memo_key = (source.root, source.digest, source.splits, cfg.image_size, cfg.cache_dir)
    if memo_key in _memo:
        return _memo[memo_key]
    folder = cache.resolve_cache_dir(cfg.cache_dir)
    cache.check_cache_dir(folder)
    native = cache.entry_name(source.digest, source.splits, 0)
    sized = cache.entry_name(source.digest, source.splits, cfg.image_size) if cfg.image_size else None
    with cache.locked(folder, native):
        entry = cache.load_entry(folder, native) or (sized and cache.load_entry(folder, sized))
        if entry:
            meta, arrays = entry
            classes = list(meta["classes"])
        else:
            decoded = decode(source, cfg.image_size)
            classes = decoded.classes
            arrays = {f"{k}_{s}": v[s] for k, v in (("x", decoded.x), ("y", decoded.y)) for s in ("train", "test")}
            meta = {"source": str(source.root), "kind": source.kind, "digest": source.digest,
                    "splits": list(source.splits), "classes": classes}
            cache.save_entry(folder, sized if decoded.resized else native, meta, arrays)
    x_train, x_test = (resize_images(arrays[k], cfg.image_size) for k in ("x_train", "x_test"))
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    mean, std = channel_stats(x_train, 255.0)  # the whole training split: independent of seed and subset
    info = DatasetInfo("imagefolder", 3, tuple(x_train.shape[-2:]), len(classes), mean, std)
    _memo.clear()
    _memo[memo_key] = _Images(info, x_train, y_train, x_test, y_test)
    return _memo[memo_key]


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Shapes, classes and normalisation. Needs no files except for an image folder, which it decodes (once
    per process; later runs read the decoded cache)."""
    _check_name(cfg.name)
    _check_image_size(cfg.image_size)
    if cfg.name in _KNOWN:
        channels, native, classes, mean, std = _KNOWN[cfg.name]
        size = (cfg.image_size,) * 2 if cfg.image_size else native
        return DatasetInfo(cfg.name, channels, size, classes, mean, std)
    return _image_tree(cfg).info


@dataclass
class DataSplits:
    info: DatasetInfo
    train: Loader
    val: Loader
    test: Loader


def _stratified_split(y: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, split-off) sorted index arrays; split-off holds `fraction` of each class."""
    idx = np.arange(len(y))
    if fraction == 0:
        return idx, idx[:0]
    from sklearn.model_selection import train_test_split

    try:
        keep, off = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed % 2**32)
    except ValueError as e:
        msg = " ".join(str(e).split())
        raise SuperweightsError(
            f"cannot split {what}={fraction} stratified from {len(y)} images of {len(np.unique(y))} classes: {msg}"
        ) from None
    return np.sort(keep), np.sort(off)


def _per_class_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(derived_seed(seed, SUBSET_STREAM))
    order = rng.permutation(len(y))
    kept: list[int] = []
    counts: dict[int, int] = {}
    for i in order:
        c = int(y[i])
        if counts.get(c, 0) < per_class:
            counts[c] = counts.get(c, 0) + 1
            kept.append(int(i))
    return np.sort(np.asarray(kept, dtype=np.int64))


def _load_digits(cfg: DataConfig, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are integers 0..16, so uint8 is lossless and matches how the other datasets are stored.
    x = d.images.astype(np.uint8).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    if not 0 < cfg.test_fraction < 1:
        raise SuperweightsError(f"data.test_fraction must be in (0, 1) for digits, got {cfg.test_fraction}")
    pool, test = _stratified_split(y, cfg.test_fraction, seed, "data.test_fraction")
    return x[pool], y[pool], x[test], y[test]


def _data_location(cfg: DataConfig) -> str:
    if cfg.name in CIFAR:
        return f"{CIFAR[cfg.name]['title']} folder {_abs(cfg.root) / CIFAR[cfg.name]['folder']}"
    if cfg.name == "imagefolder":
        root = _abs(cfg.root)
        return f"image archive {root}" if root.is_file() else f"image folder {root / cfg.train_split}"
    if cfg.name == "fashion-mnist":
        return f"Fashion-MNIST folder {_abs(cfg.root)}"
    return f"dataset {cfg.name}"


def _arrays(cfg: DataConfig, info: DatasetInfo, seed: int) -> tuple[tuple[np.ndarray, ...], float]:
    """(x_pool, y_pool, x_test, y_test) at data.image_size, and the pixel scale that maps them to [0, 1]."""
    if cfg.name == "imagefolder":
        t = _image_tree(cfg)
        return (t.x_train, t.y_train, t.x_test, t.y_test), 255.0
    if cfg.name == "digits":
        arrays, scale = _load_digits(cfg, seed), 16.0
    elif cfg.name == "fashion-mnist":
        arrays, scale = load_fashion_mnist(_abs(cfg.root)), 255.0
    else:
        arrays, scale = load_cifar(cfg.name, _abs(cfg.root), cfg.download, info.num_classes), 255.0
    x_pool, y_pool, x_test, y_test = arrays
    return (resize_images(x_pool, cfg.image_size), y_pool, resize_images(x_test, cfg.image_size), y_test), scale


AUTO_EVAL_PIXELS = 32_768  # automatic CPU evaluation batch: at most this many pixels (batch x H x W) per batch
AUTO_EVAL_MAX, AUTO_EVAL_MIN = 512, 32


def eval_batch_for(requested: int, image_size: tuple[int, int], device: str | torch.device = "cpu") -> int:
    """`train.eval_batch_size`, with 0 resolved: 512 on CUDA; on CPU the largest power of two in [32, 512] with
    batch x H x W <= 32,768. A CPU evaluation batch whose activations leave the caches is slower per image:
    validating 1,000 16x16 CIFAR images through wrn-16-2/10-2/16-1/10-1 took 395-498 ms at 512 and 266-286 ms
    at 128, 28x28 members 2.5 s at 512 and 0.94 s at 64, while on the 8x8 digits 256-512 is fastest (2 cores,
    2 MiB L2 each; BENCHMARKS.md, plain-loop section). Evaluation results do not depend on the batch."""
    if requested:
        return requested
    if torch.device(device).type == "cuda":
        return AUTO_EVAL_MAX
    pixels = max(1, image_size[0] * image_size[1])
    batch = AUTO_EVAL_MAX
    while batch > AUTO_EVAL_MIN and batch * pixels > AUTO_EVAL_PIXELS:
        batch //= 2
    return batch


def load_data(cfg: DataConfig, seed: int, batch_size: int, eval_batch_size: int,
              device: str | torch.device = "cpu") -> DataSplits:
    """The train / validation / test loaders of `cfg`; `device` (where evaluation runs) picks the automatic
    evaluation batch (`eval_batch_size` 0)."""
    info = dataset_info(cfg)
    if not 0 <= cfg.val_fraction < 1:
        raise SuperweightsError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.train_per_class < 0:
        raise SuperweightsError(f"data.train_per_class must be >= 0 (0 = all), got {cfg.train_per_class}")
    for key, value, low in (("train.batch_size", batch_size, 1), ("train.eval_batch_size", eval_batch_size, 0)):
        if value < low:
            raise SuperweightsError(f"{key} must be >= {low}{' (0 = automatic)' if low == 0 else ''}, got {value}")
    eval_batch_size = eval_batch_for(eval_batch_size, info.image_size, device)
    (x_pool, y_pool, x_test, y_test), scale = _arrays(cfg, info, seed)
    present = np.unique(y_pool)
    if len(present) < 2:
        raise SuperweightsError(
            f"{_data_location(cfg)} holds training images of {len(present)} class(es) only: a classifier needs "
            "at least 2 classes"
        )
    train, val = _stratified_split(y_pool, cfg.val_fraction, seed, "data.val_fraction")
    if cfg.train_per_class > 0:  # after the validation split: the validation images stay the same
        train = train[_per_class_subset(y_pool[train], cfg.train_per_class, seed)]
    augment = cfg.augment and cfg.name != "digits"

    def loader(x: np.ndarray, y: np.ndarray, bs: int, shuffle: bool, aug: bool) -> Loader:
        tx = torch.from_numpy(np.ascontiguousarray(x))
        ty = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        return Loader(tx, ty, bs, scale=scale, shuffle=shuffle, augment=aug, seed=seed)

    return DataSplits(
        info=info,
        train=loader(x_pool[train], y_pool[train], batch_size, True, augment),
        val=loader(x_pool[val], y_pool[val], eval_batch_size, False, False),
        test=loader(x_test, y_test, eval_batch_size, False, False),
    )

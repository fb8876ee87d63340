"""Datasets as in-memory uint8 tensors and seeded, shardable batch loaders.

Loaders yield un-normalised float32 images in [0, 1]; the model applies `DatasetInfo.mean/std`, so the
same loader serves every member and the normalisation travels with the saved model.
Nothing here touches the network unless `data.download=true` is asked for (CIFAR only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import SuperweightsError
from ensemble.config import DataConfig
from ensemble.safe_unpickle import ForbiddenGlobalError, restricted_loads

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Whole sklearn digits set (1,797 images, all 64 pixels pooled) scaled by 1/16, population statistics:
#   x = load_digits().images.astype(np.float64) / 16; x.mean(), x.std()
DIGITS_MEAN = (0.30526028624095713,)
DIGITS_STD = (0.3760492217920148,)
# Per-channel statistics of the CIFAR training sets in [0, 1] scale. The std is the true per-pixel one, not
# the often-copied (0.2023, 0.1994, 0.2010), which is a per-image average and under-states the spread.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": "test_batch",
        "label_key": "labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "train": ("train",),
        "test": "test",
        "label_key": "fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "archive": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}

# The official md5 of every file of the python-format archives, as torchvision's CIFAR10/CIFAR100 carry them
# (`train_list`, `test_list`, `meta`; a test checks they agree). A batch file is unpickled only when its bytes
# have the official md5, so a planted or damaged file is refused before any of it is read as a pickle. md5 is
# broken for collisions, not for matching a given file: nobody can make a second file with these digests.
# Tests building tiny CIFAR folders register their files' digests here; there is deliberately no switch that
# skips the check (re-packed files are refused: re-download or re-extract the official archive).
CIFAR_MD5: dict[str, dict[str, str]] = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}

# All the globals a python-format CIFAR batch refers to: a batch is a dict of (bytes or str) keys to a uint8
# numpy array ("data"), lists of ints (labels), bytes/str (batch_label) and lists of bytes/str (filenames).
# Containers, ints and strings are pickle opcodes; only the array needs globals: numpy pickles an ndarray as
# `_reconstruct(ndarray, (0,), b"b")` + state holding a `dtype(...)`. The archives were written by Python 2
# numpy (`numpy.core.multiarray`); numpy >= 2 writes `numpy._core.multiarray` (and keeps the old name loadable).
_CIFAR_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


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
    return Path(root).expanduser().resolve()


def _imagefolder_classes(root: Path) -> list[str]:
    train = root / "train"
    if not train.is_dir():
        raise SuperweightsError(
            f"image folder {train} not found: expected {root}/train/<class>/*.png|jpg|jpeg "
            f"and {root}/val/<class>/... (set data.root)"
        )
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SuperweightsError(
            f"image folder {train} has no class subfolders: expected {train}/<class>/*.png|jpg|jpeg"
        )
    if len(classes) < 2:
        # One class trains to a constant "prediction" and reports accuracy 1.0: no classifier to learn.
        raise SuperweightsError(
            f"image folder {train} has only 1 class subfolder ({classes[0]!r}): a classifier needs at least 2 "
            f"classes, one subfolder of images each ({train}/<class>/*.png|jpg|jpeg)"
        )
    return classes


def _check_image_size(size: int) -> None:
    if size < 1:
        raise SuperweightsError(f"data.image_size must be >= 1, got {size}")


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    _check_name(cfg.name)
    if cfg.name == "digits":
        return DatasetInfo("digits", 1, (8, 8), 10, DIGITS_MEAN, DIGITS_STD)
    if cfg.name == "cifar10":
        return DatasetInfo("cifar10", 3, (32, 32), 10, CIFAR10_MEAN, CIFAR10_STD)
    if cfg.name == "cifar100":
        return DatasetInfo("cifar100", 3, (32, 32), 100, CIFAR100_MEAN, CIFAR100_STD)
    _check_image_size(cfg.image_size)
    classes = _imagefolder_classes(_abs(cfg.root))
    s = cfg.image_size
    return DatasetInfo("imagefolder", 3, (s, s), len(classes), IMAGENET_MEAN, IMAGENET_STD)


def _derived_seed(*parts: int) -> int:
    # SeedSequence mixes (seed, epoch, stream) so neighbouring seeds/epochs give unrelated streams.
    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


_PERM_STREAM, _AUG_STREAM, _SUBSET_STREAM = 1, 2, 3


class Loader:
    """Iterable over `(x float32 (B,C,H,W) in [0,1], y int64 (B,))`.

    Order and augmentation are a pure function of (seed, epoch): iterating twice without `set_epoch` repeats
    the same epoch. A shard sees the same global batches as the unsharded loader and yields its contiguous
    slice of each, so data-parallel replicas together see exactly the single-process batches.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        scale: float,
        shuffle: bool,
        augment: bool,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size < 1:
            raise SuperweightsError(f"batch size must be >= 1, got {batch_size}")
        self._x, self._y = x, y
        self._batch_size = batch_size
        self._scale = scale
        self._shuffle, self._augment, self._seed = shuffle, augment, seed
        self._rank, self._world = rank, world
        self._epoch = 0
        self.num_examples = sum(hi - lo for lo, hi in self._slices())

    def __len__(self) -> int:
        return -(-len(self._y) // self._batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def shard(self, rank: int, world: int) -> Loader:
        if self._world != 1:
            raise SuperweightsError(
                "cannot shard a loader that is already a shard: shard the unsharded loader"
            )
        if world < 1 or not 0 <= rank < world:
            raise SuperweightsError(
                f"shard rank must be in [0, world) with world >= 1, got rank={rank}, world={world}"
            )
        if self._batch_size % world:
            raise SuperweightsError(
                f"batch size {self._batch_size} is not divisible by the {world} data-parallel workers: "
                f"choose a batch size that is a multiple of {world}"
            )
        view = Loader(
            self._x,
            self._y,
            self._batch_size,
            scale=self._scale,
            shuffle=self._shuffle,
            augment=self._augment,
            seed=self._seed,
            rank=rank,
            world=world,
        )
        view._epoch = self._epoch
        return view

    def _slices(self) -> Iterator[tuple[int, int]]:
        """(start, end) epoch positions of this rank's slice, one per global batch."""
        n, b = len(self._y), self._batch_size
        for start in range(0, n, b):
            m = min(b, n - start)
            # A short last batch is split as evenly as it goes (sizes differ by <= 1, possibly 0) so every
            # rank still yields the same number of batches and collectives stay in lockstep.
            q, r = divmod(m, self._world)
            lo = start + self._rank * q + min(self._rank, r)
            yield lo, lo + q + (1 if self._rank < r else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, epoch = len(self._y), self._epoch
        if self._shuffle:
            g = torch.Generator().manual_seed(_derived_seed(self._seed, epoch, _PERM_STREAM))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        aug = None
        if self._augment and n:
            h, w = self._x.shape[-2:]
            pad = max(1, round(4 * min(h, w) / 32))
            g = torch.Generator().manual_seed(_derived_seed(self._seed, epoch, _AUG_STREAM))
            # Drawn for the whole epoch up front, indexed by position, so a shard's slice gets exactly the
            # augmentation the same examples get in the unsharded batch.
            offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            aug = (pad, offsets, flips)
        for lo, hi in self._slices():
            idx = order[lo:hi]
            x = self._x[idx]
            if aug is not None:
                pad, offsets, flips = aug
                x = _crop_flip(x, pad, offsets[lo:hi], flips[lo:hi])
            yield x.to(torch.float32).div_(self._scale), self._y[idx]


def _crop_flip(x: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w)  # (B, W)
    out = padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


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
    rng = np.random.default_rng(_derived_seed(seed, _SUBSET_STREAM))
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


def _read_checked(path: Path, name: str, spec: dict) -> bytes:
    """The file's bytes, once they are known to be the official file (the same bytes are then unpickled, so
    the file cannot be swapped between the check and the load)."""
    title = spec["title"]
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SuperweightsError(f"cannot read {title} file {path}: {' '.join(str(e).split())}") from None
    expected = CIFAR_MD5[name].get(path.name)  # a name with no official md5 is refused too (fail closed)
    got = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if got != expected:
        raise SuperweightsError(
            f"{title} file {path} does not match the official {title} md5 (md5 {got}, expected {expected}): "
            f"it is damaged or not an original {title} file, so it is not loaded; re-download it (delete "
            f"{path.parent} and rerun with data.download=true (--download), or extract the official "
            f"{spec['archive']} into {path.parent.parent} again)"
        )
    return raw


def _unpickle(path: Path, name: str, spec: dict) -> dict:
    title = spec["title"]
    raw = _read_checked(path, name, spec)
    try:
        d = restricted_loads(raw, _CIFAR_PICKLE_GLOBALS, encoding="bytes")
    except ForbiddenGlobalError as e:
        raise SuperweightsError(
            f"{title} file {path} holds a {e.qualname} object, which a CIFAR batch never contains: "
            "refusing to load it"
        ) from None
    except Exception as e:  # a damaged pickle fails in many types (also inside numpy); one line either way
        raise SuperweightsError(f"cannot read {title} file {path}: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise SuperweightsError(
            f"{title} file {path} is not a python-format CIFAR batch (expected a pickled dict)"
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_cifar_batch(path: Path, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    spec = _CIFAR[name]
    d = _unpickle(path, name, spec)
    if "data" not in d or spec["label_key"] not in d:
        raise SuperweightsError(
            f"{spec['title']} file {path} lacks the 'data' or '{spec['label_key']}' entry of a python-format batch"
        )
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[spec["label_key"]], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise SuperweightsError(
            f"{spec['title']} file {path} has data of shape {data.shape} and {len(labels)} labels; "
            "expected (N, 3072) uint8 and N labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise SuperweightsError(f"{spec['title']} file {path} has labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(cfg: DataConfig, num_classes: int) -> tuple[np.ndarray, ...]:
    spec = _CIFAR[cfg.name]
    root = _abs(cfg.root)
    folder = root / spec["folder"]
    names = (*spec["train"], spec["test"])

    def missing() -> list[str]:
        return [n for n in names if not (folder / n).is_file()]

    if missing() and cfg.download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(
                spec["url"], download_root=str(root), filename=spec["archive"], md5=spec["md5"]
            )
        except Exception as e:  # network failures come in many types; the user needs one line either way
            raise SuperweightsError(
                f"could not download {spec['title']} from {spec['url']} into {root}: {' '.join(str(e).split())}"
            ) from None
    if missing():
        raise SuperweightsError(
            f"{spec['title']} files not found in {folder} (missing {', '.join(missing())}): place the python-format "
            f"archive there (extract {spec['archive']} into {root}) or set data.download=true (--download) "
            "where a network exists"
        )
    parts = [_read_cifar_batch(folder / n, cfg.name, num_classes) for n in spec["train"]]
    x_test, y_test = _read_cifar_batch(folder / spec["test"], cfg.name, num_classes)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test


def _read_image_dir(split_dir: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    index = {c: i for i, c in enumerate(classes)}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if class_dir.name not in index:
            raise SuperweightsError(
                f"class folder {class_dir} has no counterpart in {split_dir.parent / 'train'}: "
                "every val class must also be a train class"
            )
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
            except OSError as e:
                raise SuperweightsError(f"cannot read image {f}: {' '.join(str(e).split())}") from None
            ys.append(index[class_dir.name])
    if not xs:
        raise SuperweightsError(f"no images in {split_dir}: expected {split_dir}/<class>/*.png|jpg|jpeg")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _load_imagefolder(cfg: DataConfig) -> tuple[np.ndarray, ...]:
    root = _abs(cfg.root)
    classes = _imagefolder_classes(root)
    if not (root / "val").is_dir():
        raise SuperweightsError(
            f"image folder {root / 'val'} not found: expected {root}/val/<class>/*.png|jpg|jpeg (used as the test split)"
        )
    x_train, y_train = _read_image_dir(root / "train", classes, cfg.image_size)
    empty = [c for i, c in enumerate(classes) if not (y_train == i).any()]
    if empty:
        raise SuperweightsError(f"class folder {root / 'train' / empty[0]} has no .png/.jpg/.jpeg images")
    x_test, y_test = _read_image_dir(root / "val", classes, cfg.image_size)
    return x_train, y_train, x_test, y_test


def _data_location(cfg: DataConfig) -> str:
    if cfg.name in _CIFAR:
        return f"{_CIFAR[cfg.name]['title']} folder {_abs(cfg.root) / _CIFAR[cfg.name]['folder']}"
    if cfg.name == "imagefolder":
        return f"image folder {_abs(cfg.root) / 'train'}"
    return f"dataset {cfg.name}"


def load_data(cfg: DataConfig, seed: int, batch_size: int, eval_batch_size: int) -> DataSplits:
    info = dataset_info(cfg)
    if not 0 <= cfg.val_fraction < 1:
        raise SuperweightsError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.train_per_class < 0:
        raise SuperweightsError(f"data.train_per_class must be >= 0 (0 = all), got {cfg.train_per_class}")
    for key, value in (("train.batch_size", batch_size), ("train.eval_batch_size", eval_batch_size)):
        if value < 1:
            raise SuperweightsError(f"{key} must be >= 1, got {value}")
    if cfg.name == "digits":
        x_pool, y_pool, x_test, y_test = _load_digits(cfg, seed)
        scale = 16.0
    elif cfg.name in _CIFAR:
        x_pool, y_pool, x_test, y_test = _load_cifar(cfg, info.num_classes)
        scale = 255.0
    else:
        x_pool, y_pool, x_test, y_test = _load_imagefolder(cfg)
        scale = 255.0
    present = np.unique(y_pool)
    if len(present) < 2:
        raise SuperweightsError(
            f"{_data_location(cfg)} holds training images of {len(present)} class(es) only: a classifier needs "
            "at least 2 classes"
        )
    train, val = _stratified_split(y_pool, cfg.val_fraction, seed, "data.val_fraction")
    if cfg.train_per_class > 0:
        train = train[_per_class_subset(y_pool[train], cfg.train_per_class, seed)]
    augment = cfg.augment and cfg.name != "digits"

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(
            np.ascontiguousarray(y, dtype=np.int64)
        )

    def loader(x: np.ndarray, y: np.ndarray, bs: int, shuffle: bool, aug: bool) -> Loader:
        return Loader(*tensors(x, y), bs, scale=scale, shuffle=shuffle, augment=aug, seed=seed)

    return DataSplits(
        info=info,
        train=loader(x_pool[train], y_pool[train], batch_size, True, augment),
        val=loader(x_pool[val], y_pool[val], eval_batch_size, False, False),
        test=loader(x_test, y_test, eval_batch_size, False, False),
    )

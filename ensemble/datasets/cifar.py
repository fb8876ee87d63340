"""CIFAR-10/100 in torchvision's python format: md5-checked batch files read by a restricted unpickler."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from core.errors import SuperweightsError
from ensemble.safe_unpickle import ForbiddenGlobalError, restricted_loads

CIFAR = {
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
    spec = CIFAR[name]
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


def load_cifar(name: str, root: Path, download: bool, num_classes: int) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): uint8 (N, 3, 32, 32) and int64 labels."""
    spec = CIFAR[name]
    folder = root / spec["folder"]
    names = (*spec["train"], spec["test"])

    def missing() -> list[str]:
        return [n for n in names if not (folder / n).is_file()]

    if missing() and download:
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
    parts = [_read_cifar_batch(folder / n, name, num_classes) for n in spec["train"]]
    x_test, y_test = _read_cifar_batch(folder / spec["test"], name, num_classes)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test

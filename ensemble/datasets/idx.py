"""Fashion-MNIST from the standard IDX files (gzipped or not), the files torchvision's `FashionMNIST` reads.

IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then each dimension as a
big-endian uint32, then the data. Every header field and the file size are checked before the data is used.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from core.errors import SuperweightsError

TITLE = "Fashion-MNIST"
FILES = {  # split -> (images, labels), without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIDE, CLASSES = 28, 10
_UBYTE = 0x08


def _find(root: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):  # the uncompressed file when both exist: it reads faster
        if (root / name).is_file():
            return root / name
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file with `ndim` dimensions; any mismatch is a one-line error naming it."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the name
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise SuperweightsError(f"cannot read {TITLE} file {path}: {' '.join(str(e).split())}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SuperweightsError(f"{TITLE} file {path} is not an IDX file: {len(raw)} bytes, shorter than its header")
    zero, code, dims = raw[:2], raw[2], raw[3]
    if zero != b"\0\0" or code != _UBYTE or dims != ndim:
        magic = int.from_bytes(raw[:4], "big")
        raise SuperweightsError(
            f"{TITLE} file {path} has IDX magic number 0x{magic:08x}, expected 0x{0x800 + ndim:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}): not the right IDX file"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) != header + size:
        raise SuperweightsError(
            f"{TITLE} file {path} is damaged: its header says {' x '.join(map(str, shape))} = {size:,} bytes of "
            f"data, the file holds {len(raw) - header:,}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_fashion_mnist(root: Path) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): uint8 (N, 1, 28, 28) images and int64 labels 0..9."""
    paths = {base: _find(root, base) for pair in FILES.values() for base in pair}
    missing = [base for base, p in paths.items() if p is None]
    if missing:
        raise SuperweightsError(
            f"{TITLE} files not found in {root} (missing {', '.join(b + '[.gz]' for b in missing)}): place the four "
            f"IDX files there ({', '.join(b + '.gz' for b in paths)}, gzipped or not) and set data.root"
        )
    out: list[np.ndarray] = []
    for images_base, labels_base in FILES.values():
        images_path, labels_path = paths[images_base], paths[labels_base]
        x, y = read_idx(images_path, 3), read_idx(labels_path, 1)
        if x.shape[1:] != (SIDE, SIDE):
            raise SuperweightsError(
                f"{TITLE} file {images_path} holds {x.shape[1]}x{x.shape[2]} images, expected {SIDE}x{SIDE}"
            )
        if len(y) != len(x):
            raise SuperweightsError(
                f"{TITLE} files {images_path} and {labels_path} do not match: {len(x):,} images, {len(y):,} labels"
            )
        if len(y) and y.max() >= CLASSES:
            raise SuperweightsError(f"{TITLE} file {labels_path} has labels outside 0..{CLASSES - 1} (max {y.max()})")
        out += [x[:, None], y.astype(np.int64)]
    return tuple(out)

"""Image trees `<train_split>/<class>/*` + `<test_split>/<class>/*`, as a folder or a tar archive of one.

An archive (`.tar.gz`, also `.tar`, `.tar.bz2`, `.tar.xz`) is streamed in ONE pass in archive order (random
access into a gzip stream re-reads it from the start every time: quadratic), never extracted. Class names are
the sorted subfolder names of the training split (label i = i-th name); the images of each split come out
sorted by (class, file name), so a folder and an archive of it decode to the same tensors.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from core.errors import SuperweightsError

from .tensors import resize_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PATTERN = "*.png|jpg|jpeg"


@dataclass(frozen=True)
class ImageSource:
    root: Path
    kind: str  # "folder" | "archive"
    splits: tuple[str, str]  # (train, test) folder names
    digest: str  # identifies the content: see `source_digest`


@dataclass
class Decoded:
    """One uint8 (N, 3, H, W) array and int64 labels per split ("train", "test"); `resized` = not native."""

    classes: list[str]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    resized: bool


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _visible(name: str) -> bool:
    return not name.startswith(".")  # hidden files and macOS "._x.jpg" resource forks are no images


def _is_image(name: str) -> bool:
    return _visible(name) and name.lower().endswith(IMAGE_SUFFIXES)


def _expected(root: Path, splits: tuple[str, str]) -> str:
    train, test = splits
    return f"expected {root}/{train}/<class>/{PATTERN} and {root}/{test}/<class>/... (set data.root)"


def check_splits(train: str, test: str) -> None:
    for key, value in (("data.train_split", train), ("data.test_split", test)):
        if not value or "/" in value or value in (".", ".."):
            raise SuperweightsError(f"{key} must be a folder name (no '/'), got {value!r}")
    if train == test:
        raise SuperweightsError(f"data.train_split and data.test_split must differ, both are {train!r}")


def _folder_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and _visible(p.name))


def _check_classes(classes: list[str], where: Path | str) -> None:
    if not classes:
        raise SuperweightsError(f"image folder {where} has no class subfolders: expected {where}/<class>/{PATTERN}")
    if len(classes) < 2:
        # One class trains to a constant "prediction" and reports accuracy 1.0: no classifier to learn.
        raise SuperweightsError(
            f"image folder {where} has only 1 class subfolder ({classes[0]!r}): a classifier needs at least 2 "
            f"classes, one subfolder of images each ({where}/<class>/{PATTERN})"
        )


def open_source(root: Path, train: str, test: str) -> ImageSource:
    """Check the layout's first level and fingerprint the content (before anything is decoded)."""
    check_splits(train, test)
    splits = (train, test)
    if root.is_file():
        return ImageSource(root, "archive", splits, _archive_digest(root))
    train_dir = root / train
    if not train_dir.is_dir():
        raise SuperweightsError(f"image folder {train_dir} not found: {_expected(root, splits)}")
    _check_classes(_folder_classes(train_dir), train_dir)
    if not (root / test).is_dir():
        raise SuperweightsError(
            f"image folder {root / test} not found: expected {root}/{test}/<class>/{PATTERN} (used as the test "
            "split; data.test_split names it)"
        )
    return ImageSource(root, "folder", splits, _folder_digest(root, splits))


def _archive_digest(path: Path) -> str:
    """sha256 of the archive's bytes, every run (~0.1 s for CIFAR-10's 20 MB): no size/mtime shortcut, so an
    archive replaced in place is never served from a stale cache."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise SuperweightsError(f"cannot read image archive {path}: {_one_line(e)}") from None
    return "sha256:" + h.hexdigest()


def _listing(root: Path, splits: tuple[str, str]) -> dict[str, list[tuple[str, str, Path]]]:
    """split -> [(class, file name, path)] sorted, image files only."""
    out: dict[str, list[tuple[str, str, Path]]] = {}
    for split in splits:
        rows = []
        for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir() and _visible(p.name)):
            rows += [(class_dir.name, f.name, f) for f in class_dir.iterdir() if _is_image(f.name) and f.is_file()]
        out[split] = sorted(rows, key=lambda r: (r[0], r[1]))
    return out


def _folder_digest(root: Path, splits: tuple[str, str]) -> str:
    """sha256 of the listing (split, class, file, size, mtime_ns): re-hashing every image would cost as much
    as decoding it; any replaced, added or removed file changes size, mtime or the listing itself."""
    h = hashlib.sha256()
    for split, rows in _listing(root, splits).items():
        for cls, name, path in rows:
            st = path.stat()
            h.update(json.dumps([split, cls, name, st.st_size, st.st_mtime_ns]).encode() + b"\n")
    return "listing-sha256:" + h.hexdigest()


def _decode_one(data, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(data) as im:
            rgb = im if im.mode == "RGB" else im.convert("RGB")  # grey, palette, RGBA: 3 channels like the rest
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:  # PIL reports damage as OSError, SyntaxError, ValueError, ...: one line either way
        raise SuperweightsError(f"cannot read image {where}: {_one_line(e)}") from None


def _read_archive(source: ImageSource) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in source.splits}
    prefix: tuple[str, ...] | None = None
    try:
        with tarfile.open(source.root, mode="r|*") as tf:
            for member in tf:
                parts = PurePosixPath(member.name).parts
                parts = parts[1:] if parts[:1] == (".",) else parts
                if not member.isfile() or len(parts) < 3 or not _is_image(parts[-1]):
                    continue
                split, cls, name = parts[-3:]
                if split not in found or not _visible(cls):
                    continue
                if prefix is None:
                    prefix = parts[:-3]  # an optional top folder: `cifar10/train/cat/1.jpg`
                elif parts[:-3] != prefix:
                    continue
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                found[split].append((cls, name, _decode_one(io.BytesIO(data), f"{source.root}:{member.name}")))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise SuperweightsError(f"cannot read image archive {source.root}: {_one_line(e)}") from None
    return {s: sorted(rows, key=lambda r: (r[0], r[1])) for s, rows in found.items()}


def _read_folder(source: ImageSource) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    return {
        split: [(cls, name, _decode_one(path, str(path))) for cls, name, path in rows]
        for split, rows in _listing(source.root, source.splits).items()
    }


def decode(source: ImageSource, size: int) -> Decoded:
    """Every image of both splits. Same-size images stay native (`size` is applied later, on the whole
    tensor); images of different sizes are each resized to `size` here, which must then be given."""
    rows = _read_archive(source) if source.kind == "archive" else _read_folder(source)
    train, test = source.splits

    def where(split: str) -> str:
        return f"{source.root}:{split}" if source.kind == "archive" else str(source.root / split)

    for split in source.splits:
        if not rows[split]:
            raise SuperweightsError(f"no images in {where(split)}: expected {where(split)}/<class>/{PATTERN}")
    classes = sorted({cls for cls, _, _ in rows[train]})
    if source.kind == "folder":  # a class folder without images (an archive lists only what it holds)
        empty = sorted(set(_folder_classes(source.root / train)) - set(classes))
        if empty:
            raise SuperweightsError(f"class folder {source.root / train / empty[0]} has no .png/.jpg/.jpeg images")
    _check_classes(classes, where(train))
    index = {c: i for i, c in enumerate(classes)}
    for cls, _, _ in rows[test]:
        if cls not in index:
            raise SuperweightsError(
                f"class folder {cls!r} of {test} in {source.root} has no counterpart in {train}: every {test} class "
                f"must also be a {train} class"
            )
    shapes = {a.shape for split_rows in rows.values() for _, _, a in split_rows}
    resized = len(shapes) > 1
    if resized and not size:
        (s1, s2) = sorted(shapes)[:2]
        raise SuperweightsError(
            f"images in {source.root} differ in size ({s1[1]}x{s1[2]}, {s2[1]}x{s2[2]}, ...): set data.image_size "
            "to resize them all to one square size"
        )
    x, y = {}, {}
    for split, split_rows in rows.items():
        arrays = [a for _, _, a in split_rows]
        if resized:
            arrays = [resize_images(a[None], size)[0] for a in arrays]
        key = "train" if split == train else "test"
        x[key] = np.stack(arrays)
        y[key] = np.asarray([index[cls] for cls, _, _ in split_rows], dtype=np.int64)
    return Decoded(classes, x, y, resized)


"""Fashion-MNIST (IDX), image trees and archives, the decode cache, resizing and the batched augmentation.

Every source is a tiny file set the test writes itself; caches go to tmp_path. The real data in
../shared/data (relative to the repo root) is only read where a test says so, and skipped when absent.
"""

import gzip
import io
import json
import logging
import random
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import SuperweightsError
from ensemble import data as data_module
from ensemble.config import DataConfig
from ensemble.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, dataset_info, load_data
from ensemble.datasets.idx import FILES, read_idx
from ensemble.datasets.loader import crop_flip, crop_padding
from ensemble.datasets.tensors import channel_stats, resize_images

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CLASSES = ("ant", "bee", "cat")  # sorted = label order
TREE_TRAIN, TREE_TEST = 4, 2  # images per class


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """No image source is remembered between tests, and no cache outside tmp_path is ever written."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data_module._memo.clear()
    yield
    data_module._memo.clear()


def _all(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _u8(loader) -> torch.Tensor:
    return (_all(loader)[0] * 255).round().to(torch.uint8)


# ---------- Fashion-MNIST (IDX) ----------


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_fashion(root: Path, n_train=50, n_test=10, gz=("train",)) -> dict[str, np.ndarray]:
    """Images whose first pixel is the image's index; labels i % 10. `gz`: the splits written gzipped."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)
        y = (np.arange(n) % 10).astype(np.uint8)
        out[split] = x
        for base, arr in zip(FILES[split], (x, y), strict=True):
            raw = _idx(arr)
            if split in gz:
                (root / f"{base}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / base).write_bytes(raw)
    return out


def test_fashion_mnist_gz_and_raw_load(tmp_path):
    written = _write_fashion(tmp_path / "fm", gz=("train",))  # train gzipped, test raw
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "fm"), val_fraction=0.2, augment=False)
    assert dataset_info(cfg) == data_module.DatasetInfo(
        "fashion-mnist", 1, (28, 28), 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    s = load_data(cfg, 0, 8, 8)
    assert (s.train.num_examples, s.val.num_examples, s.test.num_examples) == (40, 10, 10)
    x, y = _all(s.test)
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(_u8(s.test)[:, 0], torch.from_numpy(written["test"]))  # test order kept, /255
    assert y.tolist() == [i % 10 for i in range(10)]
    train_x, train_y = _all(s.train)
    ids = (train_x[:, 0, 0, 0] * 255).round().long()
    assert torch.equal(train_y, ids % 10)  # labels travel with their images
    small = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm"), val_fraction=0.2,
                                 train_per_class=2, image_size=14), 0, 8, 8)
    assert small.train.num_examples == 20 and _all(small.train)[0].shape == (20, 1, 14, 14)
    assert small.info.image_size == (14, 14)


def test_fashion_mnist_missing_files_name_folder_and_files(tmp_path):
    _write_fashion(tmp_path, gz=())
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(SuperweightsError) as e:
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), 0, 8, 8)
    msg = str(e.value)
    assert "\n" not in msg and f"Fashion-MNIST files not found in {tmp_path} (missing t10k-labels-idx1-ubyte[.gz])" in msg


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x00\x00\x08\x02" + raw[4:], "has IDX magic number 0x00000802, expected 0x00000803"),
    (lambda raw: raw[:-5], "is damaged: its header says 50 x 28 x 28 = 39,200 bytes of data, the file holds 39,195"),
    (lambda raw: raw + b"\0", "the file holds 39,201"),
    (lambda raw: raw[:10], "shorter than its header"),
    (lambda raw: gzip.compress(raw)[:-20], "cannot read Fashion-MNIST file"),  # a cut gzip stream
])
def test_fashion_mnist_malformed_file_is_one_line(tmp_path, damage, message):
    _write_fashion(tmp_path, gz=())
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SuperweightsError) as e:
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), 0, 8, 8)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and message in msg, msg


def test_fashion_mnist_counts_and_labels_checked(tmp_path):
    _write_fashion(tmp_path, gz=())
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(49, np.uint8)))
    with pytest.raises(SuperweightsError, match="do not match: 50 images, 49 labels"):
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), 0, 8, 8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.full(50, 10, np.uint8)))
    with pytest.raises(SuperweightsError, match=r"labels outside 0..9 \(max 10\)"):
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), 0, 8, 8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.arange(50, dtype=np.uint8) % 10))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((10, 27, 27), np.uint8)))
    with pytest.raises(SuperweightsError, match="t10k-images-idx3-ubyte holds 27x27 images, expected 28x28"):
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)), 0, 8, 8)


@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason=f"shared data {SHARED} absent")
def test_fashion_mnist_constants_are_the_training_set_statistics():
    x = read_idx(SHARED / "fashion-mnist" / "train-images-idx3-ubyte.gz", 3)
    assert x.shape == (60000, 28, 28)
    mean, std = channel_stats(x[:, None], 255.0)
    assert mean[0] == pytest.approx(FASHION_MNIST_MEAN[0], abs=1e-6)
    assert std[0] == pytest.approx(FASHION_MNIST_STD[0], abs=1e-6)


# ---------- image trees, archives and the cache ----------


def _tree_images(size=(12, 12), seed=3) -> dict[tuple[str, str, str], np.ndarray]:
    """(split, class, file) -> HWC uint8 image; pixel [0, 0, 0] = the image's number within its split."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", TREE_TRAIN), ("test", TREE_TEST)):
        k = 0
        for cls in CLASSES:
            for i in range(n):
                img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                img[0, 0, 0] = k
                out[(split, cls, f"{i:03d}.png")] = img
                k += 1
    return out


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write_tree(root: Path, images=None) -> Path:
    for (split, cls, name), img in (images or _tree_images()).items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / split / cls / name).write_bytes(_png(img))
    (root / "train" / "ant" / "README.txt").write_text("not an image")
    return root


def _write_archive(path: Path, images=None, top: str = "tree", corrupt: str | None = None) -> Path:
    """A .tar.gz of the tree, members in a shuffled order, under an optional top folder."""
    items = list((images or _tree_images()).items())
    random.Random(0).shuffle(items)
    with tarfile.open(path, "w:gz") as tf:
        for (split, cls, name), img in items:
            member = f"{split}/{cls}/{name}"
            data = b"\xff\xd8 not a jpeg" if member == corrupt else _png(img)
            info = tarfile.TarInfo(f"{top}/{member}" if top else member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _cfg(root: Path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("test_split", "test")
    kw.setdefault("val_fraction", 0.25)
    kw.setdefault("augment", False)
    return DataConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


def _expected(split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = sorted((k, v) for k, v in _tree_images().items() if k[0] == split)
    x = np.stack([v.transpose(2, 0, 1) for _, v in rows])
    return x, np.asarray([CLASSES.index(k[1]) for k, _ in rows])


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_image_tree_shapes_label_order_splits_and_statistics(tmp_path, kind):
    root = _write_tree(tmp_path / "tree") if kind == "folder" else _write_archive(tmp_path / "tree.tar.gz")
    cfg = _cfg(root, tmp_path)
    info = dataset_info(cfg)
    assert (info.name, info.in_channels, info.image_size, info.num_classes) == ("imagefolder", 3, (12, 12), 3)
    x_train, y_train = _expected("train")
    xf = x_train.astype(np.float64) / 255
    assert info.mean == pytest.approx(tuple(xf.mean((0, 2, 3))), abs=1e-6)  # measured, not ImageNet's
    assert info.std == pytest.approx(tuple(xf.std((0, 2, 3))), abs=1e-6)
    s = load_data(cfg, 0, 4, 4)
    assert s.info == info
    assert (s.train.num_examples, s.val.num_examples, s.test.num_examples) == (9, 3, 6)
    x_test, y_test = _expected("test")
    assert torch.equal(_u8(s.test), torch.from_numpy(x_test))  # sorted by (class, file), lossless PNG
    assert _all(s.test)[1].tolist() == y_test.tolist() == [0, 0, 1, 1, 2, 2]
    tx, ty = _all(s.train)
    vx, vy = _all(s.val)
    ids = ((torch.cat([tx, vx])[:, 0, 0, 0]) * 255).round().long()
    assert sorted(ids.tolist()) == list(range(12))  # train + val = the training split, disjoint
    assert torch.equal(torch.cat([ty, vy]), torch.from_numpy(y_train)[ids])
    assert sorted(vy.tolist()) == [0, 1, 2]  # stratified


def test_archive_decodes_to_the_same_tensors_as_the_folder(tmp_path):
    folder = load_data(_cfg(_write_tree(tmp_path / "tree"), tmp_path), 0, 4, 4)
    for top in ("", "tree"):
        data_module._memo.clear()
        archive = load_data(_cfg(_write_archive(tmp_path / f"t{top}.tar.gz", top=top), tmp_path), 0, 4, 4)
        for a, b in ((folder.train, archive.train), (folder.val, archive.val), (folder.test, archive.test)):
            assert torch.equal(_all(a)[0], _all(b)[0]) and torch.equal(_all(a)[1], _all(b)[1])
        assert archive.info == folder.info


def test_archive_is_read_in_one_streaming_pass(tmp_path, monkeypatch):
    path = _write_archive(tmp_path / "t.tar.gz")
    modes = []
    real = tarfile.open

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode", args[1] if len(args) > 1 else "r"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tarfile, "open", spy)
    load_data(_cfg(path, tmp_path), 0, 4, 4)
    assert modes == ["r|*"]  # stream mode: no seeking back, no second pass


def test_split_folder_names_are_configurable(tmp_path):
    root = _write_tree(tmp_path / "tree")
    (root / "test").rename(root / "holdout")
    s = load_data(_cfg(root, tmp_path, test_split="holdout"), 0, 4, 4)
    assert s.test.num_examples == 6
    with pytest.raises(SuperweightsError) as e:
        load_data(_cfg(root, tmp_path), 0, 4, 4)
    assert f"image folder {root / 'test'} not found" in str(e.value) and "data.test_split" in str(e.value)
    with pytest.raises(SuperweightsError, match="must differ"):
        dataset_info(_cfg(root, tmp_path, test_split="train"))
    with pytest.raises(SuperweightsError, match=r"data.train_split must be a folder name \(no '/'\)"):
        dataset_info(_cfg(root, tmp_path, train_split="a/b"))
    assert DataConfig().test_split == "val" and DataConfig().train_split == "train"  # the old layout's names


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_corrupt_image_is_one_line_naming_the_file(tmp_path, kind):
    if kind == "folder":
        root = _write_tree(tmp_path / "tree")
        bad = root / "train" / "bee" / "001.png"
        bad.write_bytes(bad.read_bytes()[:40])  # truncated
        where = str(bad)
    else:
        root = _write_archive(tmp_path / "t.tar.gz", corrupt="train/bee/001.png")
        where = f"{root}:tree/train/bee/001.png"
    with pytest.raises(SuperweightsError) as e:
        load_data(_cfg(root, tmp_path), 0, 4, 4)
    msg = str(e.value)
    assert msg.startswith(f"cannot read image {where}: ") and "\n" not in msg, msg


def test_not_an_archive_is_one_line(tmp_path):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(b"plain text, no archive")
    with pytest.raises(SuperweightsError) as e:
        load_data(_cfg(path, tmp_path), 0, 4, 4)
    assert str(e.value).startswith(f"cannot read image archive {path}: ") and "\n" not in str(e.value)


def test_archive_without_the_split_is_one_line(tmp_path):
    path = _write_archive(tmp_path / "t.tar.gz")
    with pytest.raises(SuperweightsError) as e:
        load_data(_cfg(path, tmp_path, test_split="val"), 0, 4, 4)
    assert f"no images in {path}:val: expected {path}:val/<class>/" in str(e.value)


def test_cached_decode_equals_a_fresh_one_and_is_used(tmp_path, monkeypatch):
    root = _write_archive(tmp_path / "t.tar.gz")
    cfg = _cfg(root, tmp_path)
    fresh = load_data(cfg, 0, 4, 4)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".safetensors")
    meta = json.loads((tmp_path / "cache" / entries[0]).read_text())
    assert meta["classes"] == list(CLASSES) and meta["kind"] == "archive" and meta["digest"].startswith("sha256:")
    data_module._memo.clear()
    monkeypatch.setattr(data_module, "decode", lambda *a: pytest.fail("decoded again despite the cache"))
    cached = load_data(cfg, 0, 4, 4)
    for a, b in ((fresh.train, cached.train), (fresh.val, cached.val), (fresh.test, cached.test)):
        assert torch.equal(_all(a)[0], _all(b)[0]) and torch.equal(_all(a)[1], _all(b)[1])
    assert cached.info == fresh.info
    # another size of the same source reuses the native decode, resized on tensors
    data_module._memo.clear()
    assert load_data(_cfg(root, tmp_path, image_size=6), 0, 4, 4).info.image_size == (6, 6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "xdg") == ["cache", "t.tar.gz"]  # nothing next to the data


def test_changed_source_gets_a_new_cache_entry(tmp_path):
    root = _write_tree(tmp_path / "tree")
    first = load_data(_cfg(root, tmp_path), 0, 4, 4)
    images = _tree_images(seed=9)
    (root / "test" / "ant" / "000.png").write_bytes(_png(images[("test", "ant", "000.png")]))
    data_module._memo.clear()
    second = load_data(_cfg(root, tmp_path), 0, 4, 4)
    assert not torch.equal(_all(first.test)[0], _all(second.test)[0])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("tamper", ["weights", "sidecar", "truncate"])
def test_tampered_cache_is_detected_and_rebuilt(tmp_path, caplog, tamper):
    root = _write_archive(tmp_path / "t.tar.gz")
    cfg = _cfg(root, tmp_path)
    fresh = _u8(load_data(cfg, 0, 4, 4).test)
    blob = next((tmp_path / "cache").glob("*.safetensors"))
    sidecar = blob.with_suffix(".json")
    if tamper == "weights":  # same size, one pixel changed
        raw = bytearray(blob.read_bytes())
        raw[-1] ^= 0xFF
        blob.write_bytes(bytes(raw))
    elif tamper == "sidecar":
        meta = json.loads(sidecar.read_text())
        meta["tensors"]["x_test"][1][0] = 5
        sidecar.write_text(json.dumps(meta))
    else:
        blob.write_bytes(blob.read_bytes()[:100])
    data_module._memo.clear()
    with caplog.at_level(logging.WARNING, logger="superweights.data"):
        again = _u8(load_data(cfg, 0, 4, 4).test)
    warned = [r.getMessage() for r in caplog.records if "decoded-image cache" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "is damaged" in warned[0] and str(blob) in warned[0]
    assert torch.equal(again, fresh)
    data_module._memo.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="superweights.data"):
        load_data(cfg, 0, 4, 4)  # rebuilt: valid again
    assert not caplog.records


def test_unwritable_cache_still_loads(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    cfg = DataConfig(name="imagefolder", root=str(_write_tree(tmp_path / "tree")), test_split="test", val_fraction=0.25,
                     cache_dir=str(tmp_path / "file" / "sub"))
    with caplog.at_level(logging.WARNING, logger="superweights.data"):
        assert load_data(cfg, 0, 4, 4).test.num_examples == 6
    assert any("cannot write the decoded-image cache" in r.getMessage() for r in caplog.records)
    with pytest.raises(SuperweightsError, match="is a file, not a folder"):
        data_module._memo.clear()
        load_data(DataConfig(name="imagefolder", root=cfg.root, test_split="test",
                             cache_dir=str(tmp_path / "file")), 0, 4, 4)


def test_default_cache_dir_is_the_user_cache(tmp_path, monkeypatch):
    from ensemble.datasets.cache import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "superweights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "superweights"


def test_mixed_sizes_need_an_image_size(tmp_path):
    images = _tree_images()
    images[("train", "cat", "000.png")] = np.zeros((20, 8, 3), np.uint8)
    root = _write_tree(tmp_path / "tree", images)
    with pytest.raises(SuperweightsError) as e:
        dataset_info(_cfg(root, tmp_path))
    assert "differ in size" in str(e.value) and "set data.image_size" in str(e.value)
    s = load_data(_cfg(root, tmp_path, image_size=10), 0, 4, 4)
    assert _all(s.train)[0].shape[1:] == (3, 10, 10) and s.info.image_size == (10, 10)
    data_module._memo.clear()
    again = load_data(_cfg(root, tmp_path, image_size=10), 0, 4, 4)  # from the sized cache entry
    assert torch.equal(_all(again.test)[0], _all(s.test)[0])


def test_train_per_class_applies_to_image_trees(tmp_path):
    s = load_data(_cfg(_write_tree(tmp_path / "tree"), tmp_path, val_fraction=0.25, train_per_class=2), 0, 4, 4)
    assert s.train.num_examples == 6 and sorted(_all(s.train)[1].tolist()) == [0, 0, 1, 1, 2, 2]
    assert s.val.num_examples == 3


# ---------- resizing and augmentation on tensors ----------


def test_area_downsampling_averages_blocks():
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    y = resize_images(x, 16)
    blocks = x.reshape(5, 3, 16, 2, 16, 2).astype(np.float64).mean((3, 5))
    assert y.dtype == np.uint8 and y.shape == (5, 3, 16, 16)
    assert np.abs(y.astype(np.float64) - blocks).max() <= 0.5 + 1e-9  # each pixel the rounded 2x2 mean
    assert resize_images(x, 0) is x and resize_images(x, 32) is x
    assert resize_images(x, 12).shape == (5, 3, 12, 12)  # non-integer factors too (adaptive area)
    assert resize_images(x, 40).shape == (5, 3, 40, 40)


def test_image_size_applies_to_every_dataset():
    s = load_data(DataConfig(image_size=4), 0, 64, 64)
    x, _ = _all(s.test)
    assert x.shape[1:] == (1, 4, 4) and s.info.image_size == (4, 4)
    assert dataset_info(DataConfig(name="cifar10", image_size=16)).image_size == (16, 16)
    assert dataset_info(DataConfig(name="fashion-mnist")).image_size == (28, 28)
    with pytest.raises(SuperweightsError, match="data.image_size must be >= 0"):
        dataset_info(DataConfig(image_size=-1))


@pytest.mark.parametrize("side, pad", [(32, 4), (28, 4), (16, 2), (12, 2), (8, 1), (4, 1), (1, 1)])
def test_crop_padding_is_an_eighth_of_the_side(side, pad):
    assert crop_padding(side, side) == pad


def test_batched_crop_flip_equals_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (9, 3, 16, 12), dtype=torch.uint8, generator=g)
    pad = crop_padding(16, 12)
    offsets = torch.randint(0, 2 * pad + 1, (9, 2), generator=g)
    flips = torch.rand(9, generator=g) < 0.5
    got = crop_flip(x, pad, offsets, flips)
    for i in range(9):
        p = F.pad(x[i], (pad, pad, pad, pad))
        r, c = offsets[i].tolist()
        ref = p[:, r : r + 16, c : c + 12]
        assert torch.equal(got[i], ref.flip(-1) if flips[i] else ref)


def test_absolute_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    """What the driver ships to Ray Train workers, which run in a folder of their own."""
    monkeypatch.chdir(tmp_path)
    cfg = data_module.absolute_paths(DataConfig(root="../shared/data/x.tar.gz", cache_dir="c"))
    assert cfg.root == str((tmp_path.parent / "shared" / "data" / "x.tar.gz").resolve())
    assert cfg.cache_dir == str(tmp_path / "c")
    assert data_module.absolute_paths(DataConfig()).cache_dir == ""  # the default stays the user cache

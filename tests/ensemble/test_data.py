import hashlib
import os
import pickle
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import SuperweightsError
from ensemble import data as data_module
from ensemble.config import DataConfig
from ensemble.data import CIFAR_MD5, DATASETS, DatasetInfo, Loader, dataset_info, eval_batch_for, load_data

TRAIN_PER_CLASS = 6  # fake CIFAR training images per class
TEST_PER_CLASS = 2


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Decoded-image caches go to a temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def _fake_cifar_arrays(n: int, num_classes: int, offset: int, rng: np.random.Generator):
    """Images whose first two pixels encode a unique id (offset + i), so splits can be checked for overlap."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    ids = offset + np.arange(n)
    data[:, 0], data[:, 1] = ids % 256, ids // 256
    labels = [int(i % num_classes) for i in ids]
    return data, labels


def _ids(x: torch.Tensor) -> list[int]:
    px = (x[:, 0, 0, :2] * 255).round().long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def _md5s(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()}


def _register(monkeypatch, name: str, folder: Path) -> None:
    """Accept the tiny files of `folder` as if they were the official ones (for this test only)."""
    for file_name, md5 in _md5s(folder).items():
        monkeypatch.setitem(CIFAR_MD5[name], file_name, md5)


@pytest.fixture(scope="module")
def _cifar10_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c10")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    per_batch = 10 * TRAIN_PER_CLASS // 5
    for b in range(5):
        data, labels = _fake_cifar_arrays(per_batch, 10, b * per_batch, rng)
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
    data, labels = _fake_cifar_arrays(10 * TEST_PER_CLASS, 10, 5000, rng)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return root


@pytest.fixture
def cifar10_root(_cifar10_files, monkeypatch) -> Path:
    _register(monkeypatch, "cifar10", _cifar10_files / "cifar-10-batches-py")
    return _cifar10_files


@pytest.fixture(scope="module")
def _cifar100_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n, offset in (("train", 300, 0), ("test", 100, 5000)):
        data, labels = _fake_cifar_arrays(n, 100, offset, rng)
        with open(folder / name, "wb") as f:  # str keys, as Python 3 pickles of the archive have
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, f)
    return root


@pytest.fixture
def cifar100_root(_cifar100_files, monkeypatch) -> Path:
    _register(monkeypatch, "cifar100", _cifar100_files / "cifar-100-python")
    return _cifar100_files


@pytest.fixture(scope="module")
def imagefolder_root(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(2)
    for split, n in (("train", 5), ("val", 2)):
        for c, ext in (("cat", "png"), ("dog", "jpg"), ("eel", "jpeg")):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                size = (int(rng.integers(10, 30)), int(rng.integers(10, 30)))
                Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(d / f"{i}.{ext}")
            (d / "notes.txt").write_text("not an image")
    # A grayscale image must still come out as 3 channels.
    Image.fromarray(rng.integers(0, 256, size=(12, 12), dtype=np.uint8)).save(
        root / "train" / "cat" / "gray.png"
    )
    return root


def _cifar_cfg(root: Path, name: str = "cifar10", **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), val_fraction=kw.pop("val_fraction", 0.2), **kw)


def _all(loader: Loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_dataset_info_needs_no_files(tmp_path):
    assert dataset_info(DataConfig(name="cifar10", root=str(tmp_path / "nope"))) == DatasetInfo(
        "cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    )
    c100 = dataset_info(DataConfig(name="cifar100", root=str(tmp_path / "nope")))
    assert (c100.in_channels, c100.image_size, c100.num_classes, len(c100.mean), len(c100.std)) == (
        3,
        (32, 32),
        100,
        3,
        3,
    )
    digits = dataset_info(DataConfig())
    assert (digits.in_channels, digits.image_size, digits.num_classes) == (1, (8, 8), 10)
    assert len(digits.mean) == len(digits.std) == 1


def test_digits_constants_match_data():
    from sklearn.datasets import load_digits

    x = load_digits().images / 16
    info = dataset_info(DataConfig())
    assert info.mean[0] == pytest.approx(x.mean(), abs=1e-9)
    assert info.std[0] == pytest.approx(x.std(), abs=1e-9)


@pytest.mark.parametrize("fn", [dataset_info, lambda cfg: load_data(cfg, 0, 8, 8)])
def test_unknown_dataset_name(fn):
    with pytest.raises(SuperweightsError) as e:
        fn(DataConfig(name="mnist"))
    msg = str(e.value)
    assert "'mnist'" in msg and "\n" not in msg
    assert all(name in msg for name in DATASETS)


@pytest.mark.parametrize("requested, size, device, batch", [
    (0, (8, 8), "cpu", 512),  # digits: 512 x 64 pixels = 32,768
    (0, (14, 14), "cpu", 128),
    (0, (16, 16), "cpu", 128),
    (0, (28, 28), "cpu", 32),
    (0, (32, 32), "cpu", 32),
    (0, (224, 224), "cpu", 32),  # never under 32
    (0, (1, 1), "cpu", 512),  # never over 512
    (0, (32, 32), "cuda", 512),
    (0, (32, 32), "cuda:1", 512),
    (100, (32, 32), "cpu", 100),  # a set train.eval_batch_size is kept
    (7, (8, 8), "cuda", 7),
])
def test_automatic_evaluation_batch(requested, size, device, batch):
    assert eval_batch_for(requested, size, device) == batch


def test_load_data_resolves_the_automatic_evaluation_batch_and_keeps_a_set_one():
    auto = load_data(DataConfig(), seed=0, batch_size=64, eval_batch_size=0)
    assert (auto.train.batch_size, auto.val.batch_size, auto.test.batch_size) == (64, 512, 512)
    assert load_data(DataConfig(), seed=0, batch_size=64, eval_batch_size=0, device="cuda").val.batch_size == 512
    assert load_data(DataConfig(), seed=0, batch_size=64, eval_batch_size=9).test.batch_size == 9
    with pytest.raises(SuperweightsError, match=r"^train.eval_batch_size must be >= 0 \(0 = automatic\), got -1$"):
        load_data(DataConfig(), seed=0, batch_size=64, eval_batch_size=-1)


def test_digits_shapes_sizes_and_stratification():
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.25)
    s = load_data(cfg, seed=0, batch_size=64, eval_batch_size=100)
    assert s.info.name == "digits"
    sizes = [s.train.num_examples, s.val.num_examples, s.test.num_examples]
    assert sum(sizes) == 1797
    assert s.test.num_examples == pytest.approx(0.25 * 1797, abs=1)
    assert s.val.num_examples == pytest.approx(0.2 * (1797 - s.test.num_examples), abs=1)
    assert len(s.train) == -(-s.train.num_examples // 64) and len(s.test) == -(-s.test.num_examples // 100)
    all_y = []
    for loader in (s.train, s.val, s.test):
        x, y = _all(loader)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (loader.num_examples, 1, 8, 8)
        assert 0 <= x.min() and x.max() <= 1 and x.max() == 1  # scaled by 1/16, not 1/255
        counts = np.bincount(y.numpy(), minlength=10)
        # Stratified: every class's share of the split is within one image of its share of the whole.
        all_y.append(counts)
    total = sum(all_y)
    for counts in all_y:
        expected = total * counts.sum() / total.sum()
        assert np.all(np.abs(counts - expected) <= 1.5)
    # Disjoint: the splits together are a permutation of the whole set (multiset of images matches).
    from sklearn.datasets import load_digits

    whole = sorted(map(tuple, (load_digits().images.reshape(-1, 64)).astype(int).tolist()))
    got = sorted(
        tuple(row)
        for loader in (s.train, s.val, s.test)
        for row in (_all(loader)[0].reshape(-1, 64) * 16).round().int().tolist()
    )
    assert got == whole


def test_digits_never_augmented():
    s = load_data(DataConfig(augment=True), seed=0, batch_size=32, eval_batch_size=32)
    plain = load_data(DataConfig(augment=False), seed=0, batch_size=32, eval_batch_size=32)
    assert torch.equal(_all(s.train)[0], _all(plain.train)[0])


def test_cifar10_shapes_disjoint_and_stratified(cifar10_root):
    s = load_data(_cifar_cfg(cifar10_root, augment=False), seed=0, batch_size=16, eval_batch_size=7)
    assert s.info.num_classes == 10
    assert (s.train.num_examples, s.val.num_examples, s.test.num_examples) == (48, 12, 20)
    ids = {}
    for split, loader in (("train", s.train), ("val", s.val), ("test", s.test)):
        x, y = _all(loader)
        assert (
            x.shape == (loader.num_examples, 3, 32, 32)
            and x.dtype == torch.float32
            and y.dtype == torch.int64
        )
        assert 0 <= x.min() and x.max() <= 1
        ids[split] = _ids(x)
        assert y.tolist() == [i % 10 for i in ids[split]]  # labels travel with their images
    assert set(ids["train"]).isdisjoint(ids["val"])
    assert sorted(ids["train"] + ids["val"]) == list(range(60))
    assert sorted(ids["test"]) == list(range(5000, 5020))
    # 12 of 60 images over 10 classes of 6: each class gives 1 or 2 to validation, none gives 0 or 3.
    assert (
        set(Counter(i % 10 for i in ids["val"]).values()) <= {1, 2}
        and len(set(i % 10 for i in ids["val"])) == 10
    )
    assert set(Counter(i % 10 for i in ids["train"]).values()) <= {4, 5}


def test_cifar100_loads(cifar100_root):
    s = load_data(_cifar_cfg(cifar100_root, "cifar100", val_fraction=1 / 3, augment=False), 0, 32, 64)
    assert s.info.num_classes == 100
    assert (s.train.num_examples, s.val.num_examples, s.test.num_examples) == (200, 100, 100)
    x, y = _all(s.val)
    assert x.shape == (100, 3, 32, 32)
    assert sorted(y.tolist()) == list(range(100))  # stratified: one of each class


def test_same_seed_same_split_and_order_epochs_differ(cifar10_root):
    def train_ids(seed, epoch):
        s = load_data(_cifar_cfg(cifar10_root, augment=False), seed=seed, batch_size=16, eval_batch_size=64)
        s.train.set_epoch(epoch)
        return [_ids(x) for x, _ in s.train], _ids(_all(s.val)[0])

    a, a_val = train_ids(0, 0)
    assert train_ids(0, 0) == (a, a_val)
    b, b_val = train_ids(0, 1)
    assert b_val == a_val and b != a and sorted(sum(a, [])) == sorted(sum(b, []))
    c, c_val = train_ids(1, 0)
    assert c_val != a_val


def test_val_and_test_are_not_shuffled(cifar10_root):
    s = load_data(_cifar_cfg(cifar10_root), seed=0, batch_size=16, eval_batch_size=5)
    first = _ids(_all(s.test)[0])
    s.test.set_epoch(3)
    assert _ids(_all(s.test)[0]) == first == sorted(first)


def test_augmentation_changes_images_keeps_shape_and_is_reproducible(cifar10_root):
    plain = load_data(_cifar_cfg(cifar10_root, augment=False), 0, 16, 64).train
    aug = load_data(_cifar_cfg(cifar10_root, augment=True), 0, 16, 64).train
    xp, yp = _all(plain)
    xa, ya = _all(aug)
    assert xa.shape == xp.shape and xa.dtype == torch.float32 and torch.equal(ya, yp)
    assert 0 <= xa.min() and xa.max() <= 1
    changed = (xa != xp).flatten(1).any(1)
    assert changed.float().mean() > 0.5
    assert torch.equal(_all(aug)[0], xa)
    aug.set_epoch(1)
    plain.set_epoch(1)
    assert not torch.equal(_all(aug)[0], _all(plain)[0])


def test_train_per_class_counts(cifar10_root):
    # 6 per class in the pool, 1 goes to validation: asking for 3 keeps 3, asking for 50 keeps all 5.
    for n, expected in ((3, 30), (50, 50)):
        s = load_data(_cifar_cfg(cifar10_root, val_fraction=10 / 60, train_per_class=n), 0, 16, 64)
        _, y = _all(s.train)
        assert s.train.num_examples == expected
        assert Counter(y.tolist()) == {c: expected // 10 for c in range(10)}
        assert s.val.num_examples == 10  # the subset is taken after the validation split
    d = load_data(DataConfig(train_per_class=7), 0, 32, 256)
    assert Counter(_all(d.train)[1].tolist()) == {c: 7 for c in range(10)}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_concatenate_to_global_batches(cifar10_root, world):
    s = load_data(_cifar_cfg(cifar10_root, augment=True), 0, 20, 64)  # 48 images: batches 20, 20, 8
    s.train.set_epoch(2)
    shards = [s.train.shard(r, world) for r in range(world)]
    for sh in shards:
        sh.set_epoch(2)
        assert len(sh) == len(s.train)
    assert sum(sh.num_examples for sh in shards) == s.train.num_examples
    for (gx, gy), *parts in zip(s.train, *shards, strict=True):
        assert all(len(p[1]) == 20 // world for p in parts) or len(gy) < 20
        assert torch.equal(torch.cat([p[0] for p in parts]), gx)
        assert torch.equal(torch.cat([p[1] for p in parts]), gy)


def test_shard_errors(cifar10_root):
    train = load_data(_cifar_cfg(cifar10_root), 0, 10, 64).train
    with pytest.raises(SuperweightsError, match="not divisible by the 4"):
        train.shard(0, 4)
    with pytest.raises(SuperweightsError, match="rank"):
        train.shard(2, 2)
    with pytest.raises(SuperweightsError, match="already a shard"):
        train.shard(0, 2).shard(0, 1)


@pytest.mark.parametrize(
    "name,folder,archive",
    [
        ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
    ],
)
def test_missing_cifar_files_message(tmp_path, monkeypatch, name, folder, archive):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SuperweightsError) as e:
        load_data(DataConfig(name=name, root="data", download=False), 0, 8, 8)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"files not found in {tmp_path / 'data' / folder}" in msg  # absolute, though root was relative
    assert f"extract {archive} into {tmp_path / 'data'}" in msg
    assert "data.download=true (--download)" in msg


def test_partial_cifar_folder_names_missing_file(cifar10_root, tmp_path):
    shutil.copytree(cifar10_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(SuperweightsError, match="missing data_batch_3"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)), 0, 8, 8)


def test_corrupt_cifar_file(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"not a pickle")
    (folder / "test").write_bytes(b"not a pickle")
    cfg = DataConfig(name="cifar100", root=str(tmp_path))
    with pytest.raises(SuperweightsError) as e:
        load_data(cfg, 0, 8, 8)
    msg = str(e.value)
    assert f"CIFAR-100 file {folder / 'train'} does not match the official CIFAR-100 md5" in msg
    assert "re-download it" in msg and "\n" not in msg
    _register(monkeypatch, "cifar100", folder)  # past the checksum, the pickle itself is damaged
    with pytest.raises(SuperweightsError, match="cannot read CIFAR-100 file") as e:
        load_data(cfg, 0, 8, 8)
    assert "\n" not in str(e.value)


def test_official_md5s_match_torchvision():
    datasets = pytest.importorskip("torchvision.datasets")
    for name, cls in (("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)):
        official = {f: md5 for f, md5 in (*cls.train_list, *cls.test_list)}
        official[cls.meta["filename"]] = cls.meta["md5"]
        assert CIFAR_MD5[name] == official


class _RunsCommand:
    """Pickles to `os.system(command)`: unpickling it runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant(folder: Path, file_name: str, marker: Path) -> bytes:
    payload = pickle.dumps({b"data": _RunsCommand(f"touch {marker}"), b"labels": [0]})
    (folder / file_name).write_bytes(payload)
    return payload


@pytest.mark.parametrize(
    "name,folder,file_name,title",
    [
        ("cifar10", "cifar-10-batches-py", "data_batch_1", "CIFAR-10"),
        ("cifar10", "cifar-10-batches-py", "test_batch", "CIFAR-10"),
        ("cifar100", "cifar-100-python", "train", "CIFAR-100"),
    ],
)
@pytest.mark.parametrize("md5_registered", [False, True])
def test_planted_pickle_never_runs(
    request, tmp_path, monkeypatch, name, folder, file_name, title, md5_registered
):
    source = request.getfixturevalue(f"_{name}_files") / folder
    shutil.copytree(source, tmp_path / folder)
    _register(monkeypatch, name, tmp_path / folder)  # every other file is accepted
    marker = tmp_path / "pwned"
    payload = _plant(tmp_path / folder, file_name, marker)
    # The payload is live: a plain pickle.loads runs the command (as the loader's pickle.load once did).
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    if md5_registered:
        monkeypatch.setitem(CIFAR_MD5[name], file_name, hashlib.md5(payload).hexdigest())
    with pytest.raises(SuperweightsError) as e:
        load_data(DataConfig(name=name, root=str(tmp_path)), 0, 8, 8)
    msg = str(e.value)
    assert "\n" not in msg and f"{title} file {tmp_path / folder / file_name} " in msg
    if md5_registered:  # past the checksum, the restricted unpickler refuses the callable itself
        assert f"holds a {os.system.__module__}.system object, which a CIFAR batch never contains" in msg
        assert msg.endswith("refusing to load it")
    else:  # refused on the checksum, before a byte is unpickled
        assert f"does not match the official {title} md5" in msg and "re-download it" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload,qualname",
    [
        (b"cbuiltins\neval\n(V1\ntR.", "builtins.eval"),
        (b"c__builtin__\neval\n(V1\ntR.", "__builtin__.eval"),  # Python 2 spelling, not mapped to allowed
        (b"csubprocess\ncall\n(Vtrue\ntR.", "subprocess.call"),
        (b"(cos\nsystem\nVtrue\no.", "os.system"),  # OBJ opcode
        (b"(ios\nsystem\nVtrue\n.", "os.system"),  # INST opcode (protocol 0)
        (b"cnumpy\nload\n(Vx\ntR.", "numpy.load"),
    ],
)
def test_restricted_unpickler_refuses_other_globals(payload, qualname):
    from ensemble.safe_unpickle import ForbiddenGlobalError, restricted_loads

    with pytest.raises(ForbiddenGlobalError) as e:
        restricted_loads(payload, data_module._CIFAR_PICKLE_GLOBALS)
    assert e.value.qualname == qualname


# Python 2 cPickle (protocol 2) writer for the python-format archives' layout, opcode by opcode: the official
# files were written this way by Python 2 numpy (str = bytes, `numpy.core.multiarray._reconstruct`).
def _py2_str(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _py2_array(a: np.ndarray) -> bytes:
    assert a.dtype == np.uint8
    new = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b")
    dtype = b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
    dtype += b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
    shape = b"(" + b"".join(_py2_int(d) for d in a.shape) + b"t"
    return new + b"\x87R(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(a.tobytes()) + b"tb"


def _py2_pickle(d: dict[bytes, object]) -> bytes:
    out = b"\x80\x02}("
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            enc = _py2_array(v)
        elif isinstance(v, list):
            enc = b"](" + b"".join(_py2_int(x) if isinstance(x, int) else _py2_str(x) for x in v) + b"e"
        else:
            enc = _py2_str(v)
        out += _py2_str(k) + enc
    return out + b"u."


def test_python2_format_batches_load(tmp_path, monkeypatch):
    """What the official archives hold passes the restricted unpickler (keys, array, label list, names)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(5)
    expected = {}
    for i, file_name in enumerate((*(f"data_batch_{b}" for b in range(1, 6)), "test_batch")):
        data, labels = _fake_cifar_arrays(10, 10, 100 * i, rng)
        expected[file_name] = data
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{j}.png".encode() for j in range(10)],
        }
        (folder / file_name).write_bytes(_py2_pickle(batch))
    assert pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")[b"data"].shape == (10, 3072)
    _register(monkeypatch, "cifar10", folder)
    s = load_data(DataConfig(name="cifar10", root=str(tmp_path), augment=False, val_fraction=0.2), 0, 8, 64)
    x, y = _all(s.test)
    assert torch.equal(
        (x * 255).round().to(torch.uint8).reshape(10, 3072), torch.from_numpy(expected["test_batch"])
    )
    assert y.tolist() == list(range(10))
    assert s.train.num_examples + s.val.num_examples == 50


def test_one_class_cifar_folder_is_refused(_cifar10_files, tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(_cifar10_files / "cifar-10-batches-py", folder)
    for f in folder.glob("*_batch*"):
        d = pickle.loads(f.read_bytes())
        d[b"labels"] = [0] * len(d[b"labels"])
        f.write_bytes(pickle.dumps(d))
    _register(monkeypatch, "cifar10", folder)
    with pytest.raises(SuperweightsError) as e:
        load_data(DataConfig(name="cifar10", root=str(tmp_path), val_fraction=0.0), 0, 8, 8)
    msg = str(e.value)
    assert f"CIFAR-10 folder {folder} holds training images of 1 class(es) only" in msg and "\n" not in msg


def test_imagefolder(imagefolder_root):
    cfg = DataConfig(name="imagefolder", root=str(imagefolder_root), image_size=16, val_fraction=0.2)
    info = dataset_info(cfg)
    assert (info.in_channels, info.image_size, info.num_classes) == (3, (16, 16), 3)
    s = load_data(cfg, 0, 4, 4)
    assert s.info == info
    # 16 training images (6 cat incl. a grayscale one): ceil(0.2 * 16) = 4 go to validation.
    assert (s.train.num_examples, s.val.num_examples, s.test.num_examples) == (12, 4, 6)
    for loader in (s.train, s.val, s.test):
        x, y = _all(loader)
        assert x.shape == (loader.num_examples, 3, 16, 16) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1
    assert sorted(_all(s.test)[1].tolist()) == [0, 0, 1, 1, 2, 2]
    assert set(_all(s.val)[1].tolist()) == {0, 1, 2}


def test_imagefolder_errors(tmp_path):
    cfg = DataConfig(name="imagefolder", root=str(tmp_path))
    with pytest.raises(SuperweightsError, match=r"train not found: expected .*/train/<class>"):
        dataset_info(cfg)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(SuperweightsError, match="val not found"):
        load_data(cfg, 0, 4, 4)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(SuperweightsError, match="no images in") as e:
        load_data(cfg, 0, 4, 4)
    assert "\n" not in str(e.value)


def test_one_class_imagefolder_is_refused(imagefolder_root, tmp_path):
    """One class used to train and report accuracy 1.0."""
    for split in ("train", "val"):
        shutil.copytree(imagefolder_root / split / "cat", tmp_path / split / "cat")
    (tmp_path / "train" / ".hidden").mkdir()  # not a class
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8)
    for fn in (dataset_info, lambda c: load_data(c, 0, 4, 4)):
        with pytest.raises(SuperweightsError) as e:
            fn(cfg)
        msg = str(e.value)
        assert f"image folder {tmp_path / 'train'} has only 1 class subfolder ('cat')" in msg
        assert "at least 2 classes" in msg and "\n" not in msg


def test_bad_settings():
    with pytest.raises(SuperweightsError, match="val_fraction"):
        load_data(DataConfig(val_fraction=1.0), 0, 8, 8)
    with pytest.raises(SuperweightsError, match="test_fraction"):
        load_data(DataConfig(test_fraction=0.0), 0, 8, 8)
    with pytest.raises(SuperweightsError, match="batch_size"):
        load_data(DataConfig(), 0, 0, 8)
    with pytest.raises(SuperweightsError, match="stratified"):
        load_data(DataConfig(val_fraction=0.001), 0, 8, 8)


def test_zero_val_fraction_gives_empty_val():
    s = load_data(DataConfig(val_fraction=0.0), 0, 64, 64)
    assert s.val.num_examples == 0 and len(s.val) == 0 and list(s.val) == []

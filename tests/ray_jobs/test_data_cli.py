"""Real-data paths through `superweights train` as a user runs it: a subprocess, exit codes and stderr.

The shared data lives in ../shared/data relative to the repo root (never in the project); tests that need
it are skipped with the reason when it is absent.
"""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from .conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
CIFAR_JPG = SHARED / "cifar10-jpg.tar.gz"
TINY = 'ensemble.members=["wrn-10-1","wrn-10-2"]'


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _train(tmp_path: Path, *sets: str, timeout=600):
    args = ["train", "--workers", "0", "--no-tracking", "--quiet", "--storage-path", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--set", TINY, "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    for s in sets:
        args += ["--set", s]
    return run(*args, timeout=timeout)


def test_corrupt_image_is_one_line_and_exit_2(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tf:
        for split, n in (("train", 6), ("test", 2)):
            for cls in ("a", "b"):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
                    data = buf.getvalue()
                    if (split, cls, i) == ("train", "b", 3):
                        data = data[:30]  # cut mid-header
                    info = tarfile.TarInfo(f"{split}/{cls}/{i}.jpg")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    p = _train(tmp_path, "data.name=imagefolder", f"data.root={tmp_path / 'imgs.tar.gz'}", "data.test_split=test")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"superweights: error: cannot read image {tmp_path / 'imgs.tar.gz'}:train/b/3.jpg: ")
    assert not (tmp_path / "out").exists()


def test_train_evaluates_in_automatic_batches_sized_for_the_images(tmp_path):
    """The default train.eval_batch_size (0) picks the batch from the image size on the device evaluation runs on:
    16x16 images on the CPU are evaluated 128 at a time (8x8 digits 512), and the run says so."""
    write_image_folder(tmp_path / "imgs", {"train": 8, "test": 3}, side=16)
    p = _train(tmp_path, "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.test_split=test",
               "train.epochs=1", "train.batch_size=4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "test images (evaluated 128 at a time, train.eval_batch_size automatic)" in p.stdout, p.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["train"]["eval_batch_size"] == 0  # the setting, not what it resolved to here


def test_missing_fashion_mnist_is_one_line_and_exit_2(tmp_path):
    p = _train(tmp_path, "data.name=fashion-mnist", f"data.root={tmp_path}")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"Fashion-MNIST files not found in {tmp_path} (missing " in lines[0], p.stderr


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPG.is_file(), reason=f"shared CIFAR-10 archive {CIFAR_JPG} absent")
def test_one_epoch_on_a_1000_image_cifar10_slice(tmp_path):
    """The JPEG archive streamed, decoded, cached and trained on: 100 training images per class at 16x16."""
    sets = ["data.name=imagefolder", f"data.root={CIFAR_JPG}", "data.test_split=test", "data.image_size=16",
            "data.train_per_class=100", "data.val_fraction=0.02", "train.epochs=1", "train.batch_size=100"]
    p = _train(tmp_path, *sets)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on imagefolder: 1000 train / 1000 val / 10000 test images" in p.stdout, p.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["split"] == "test" and 0.0 <= metrics["ensemble"]["accuracy"] <= 1.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["data"]["image_size"] == 16 and config["data"]["train_per_class"] == 100
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # decoded once, into the cache

"""Issue 17 measurement: the CIFAR-10 JPEG archive decoded cold vs read from the decode cache, and the training
Loader's time per epoch (batched crop + flip on tensors) as a share of a training epoch of the full ensemble.

The archive is ../shared/data/cifar10-jpg.tar.gz relative to the repo root (skipped with the reason when absent).
The cache goes to a temporary folder, so "cold" really decodes. The training share times `--steps` optimiser
steps of the given members on real batches (the loader excluded) and scales them to the epoch's batch count.
Prints the numbers; `--write` also replaces the `data` section of BENCHMARKS.md.

    python bench/bench_data.py [--image-size 16] [--per-class 500] [--batch-size 128] [--method full]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, write_section  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", default=str(ARCHIVE))
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--per-class", type=int, default=500, help="data.train_per_class of the timed slice")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--method", default="full", help="bank.method of the model whose epoch is the reference")
    p.add_argument("--members", default="", help='TOML list, e.g. \'["wrn-16-4","wrn-10-2"]\' (default: config default)')
    p.add_argument("--epochs", type=int, default=3, help="loader epochs timed (median)")
    p.add_argument("--steps", type=int, default=8, help="training steps timed (median, after 2 warm-up steps)")
    p.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = p.parse_args()
    archive = Path(args.archive)
    if not archive.is_file():
        print(f"skipped: CIFAR-10 archive {archive} absent (see ../shared/data/README.md)")
        return 0

    from ensemble import data as data_module
    from ensemble.config import load_config
    from ensemble.data import dataset_info, load_data
    from ensemble.datasets.images import open_source
    from ensemble.methods import build_ensemble
    from ensemble.training import make_optimizer, train_step

    with tempfile.TemporaryDirectory(prefix="bench-data-cache-") as cache:
        sets = ["data.name=imagefolder", f"data.root={archive}", "data.test_split=test", f"data.cache_dir={cache}",
                "data.val_fraction=0.02", f"data.train_per_class={args.per_class}", f"data.image_size={args.image_size}",
                f"bank.method={args.method}", f"train.batch_size={args.batch_size}"]
        if args.members:
            sets.append(f"ensemble.members={args.members}")
        config = load_config(None, sets)
        native = load_config(None, [*sets, "data.image_size=0"])
        t_hash, _ = _timed(lambda: open_source(archive, "train", "test"))
        t_cold, _ = _timed(lambda: dataset_info(native.data))  # stream + decode 60,000 JPEGs + write the cache
        warm = []
        for cfg in (native, config):
            data_module._memo.clear()
            warm.append(_timed(lambda cfg=cfg: dataset_info(cfg.data))[0])
        data_module._memo.clear()
        t_load, data = _timed(lambda: load_data(config.data, 0, config.train.batch_size, config.train.eval_batch_size))

    def epoch(loader, e: int) -> float:
        loader.set_epoch(e)
        t = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - t

    aug = statistics.median(epoch(data.train, e) for e in range(args.epochs))
    plain_loader = type(data.train)(data.train._x, data.train._y, config.train.batch_size, scale=255.0,
                                    shuffle=True, augment=False, seed=0)
    plain = statistics.median(epoch(plain_loader, e) for e in range(args.epochs))

    model = build_ensemble(config, data.info)
    optimizer, scheduler = make_optimizer(model, config, len(data.train), epochs=1)
    batches = [b for _, b in zip(range(args.steps + 2), data.train, strict=False)]
    model.train()
    times = []
    for i, (x, y) in enumerate(batches):
        t = time.perf_counter()
        train_step(model, x, y, optimizer, scheduler)
        if i >= 2:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    train_epoch = step * len(data.train)
    share = aug / (aug + train_epoch)

    n, h = data.train.num_examples, data.info.image_size[0]
    members = ", ".join(config.ensemble.members)
    lines = [
        f"CIFAR-10 JPEG archive ({archive.stat().st_size / 1e6:.1f} MB, 60,000 images)",
        f"  sha256 of the archive (cache key, every run): {t_hash:.2f} s",
        f"  cold: stream + decode + write cache:          {t_cold:.2f} s",
        f"  warm: cache read + verify (32x32):             {warm[0]:.2f} s",
        f"  warm: cache read + verify + area to {h}x{h}:     {warm[1]:.2f} s",
        f"  load_data (splits + loaders, warm memo):       {t_load:.2f} s",
        f"training Loader, {n:,} images at {h}x{h}, batch {config.train.batch_size} ({len(data.train)} batches):",
        f"  epoch with crop + flip: {aug * 1000:.1f} ms; without augmentation: {plain * 1000:.1f} ms",
        f"  training step ({args.method}: {members}): {step * 1000:.1f} ms -> epoch {train_epoch:.2f} s",
        f"  loader share of a training epoch: {100 * share:.2f}% (target < 5%)",
    ]
    print("\n".join(lines))
    if args.write:
        write_section("data", "## Data loading (bench/bench_data.py)\n\n```\n" + "\n".join(lines) + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ray Train scaling (issue 5): steady-state epoch time of configs/digits.toml with 2 workers over 1 worker,
and the start-up cost measured separately.

* epoch time = rank 0's wall time of one epoch (train steps + validation), median over epochs 2..E, so
  start-up, first-epoch warm-up and the final test are excluded;
* start-up = from calling the driver (Ray already up) to the start of epoch 1: checks, data, plan, the
  Ray Train controller and worker group, the workers' imports, data and model;
* also: the same loop in-process (`--workers 0`, torch's default threads) for reference.

Each Ray worker gets 1 CPU (OMP_NUM_THREADS=1); 2 workers split the 4 members into 2 FLOP-balanced groups.
Short on purpose (default 3 epochs); MLflow off (not what is measured).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, cpu_name, write_section  # noqa: E402
from ensemble.config import load_config  # noqa: E402
from ray_jobs.driver import RayOptions, train  # noqa: E402
from ray_jobs.ray_cluster import PREEMPTION_WATCHER_ENV  # noqa: E402


def run(config, workers: int, storage: str, cpus_per_worker: int = 0) -> dict:
    t0 = time.time()
    out = train(config, RayOptions(workers=workers, storage_path=storage, checkpoint_every=10_000,
                                   cpus_per_worker=cpus_per_worker),
                name=f"bench-{workers}w-{int(t0)}", track=False, log=lambda s: None)
    total = time.time() - t0
    h = out.history
    first_start = h[0]["ended_at"] - h[0]["seconds"]
    return {
        "workers": workers,
        "layout": f"{out.layout.member_groups}x{out.layout.data_replicas}",
        "epoch_s": statistics.median(r["seconds"] for r in h[1:]) if len(h) > 1 else h[0]["seconds"],
        "first_epoch_s": h[0]["seconds"],
        "startup_s": first_start - t0,
        "after_s": t0 + total - h[-1]["ended_at"],  # final test, anytime record, checkpoint, teardown
        "total_s": total,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.toml"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    config = load_config(args.config, [f"train.epochs={args.epochs}"])
    t = time.time()
    # Ray's own processes at ERROR, as `superweights train` runs them (ray_jobs.ray_cluster): without a dashboard
    # Ray Train's placement-group cleaner otherwise warns every second that it cannot query the state API.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             logging_config=ray.LoggingConfig(log_level="ERROR"),
             runtime_env={"env_vars": {PREEMPTION_WATCHER_ENV: "0"}})  # nothing to watch on one machine
    init_s = time.time() - t
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for workers, cpus in ((1, 0), (1, 1), (2, 0), (0, 0)):
            rows.append(run(config, workers, storage, cpus))
            r = rows[-1]
            print(f"workers={workers} cpus/worker={cpus or 'shared'} ({r['layout']}): epoch {r['epoch_s']:.2f}s (first {r['first_epoch_s']:.2f}s), "
                  f"start-up {r['startup_s']:.1f}s, after training {r['after_s']:.1f}s, total {r['total_s']:.1f}s",
                  flush=True)
    ray.shutdown()
    one, one_thread, two, local = rows
    ratio = two["epoch_s"] / one["epoch_s"]
    ratio_1cpu = two["epoch_s"] / one_thread["epoch_s"]
    print(f"ray.init (local, 2 CPUs): {init_s:.1f}s")
    print(f"epoch time 2 workers / 1 worker (2 CPUs): {ratio:.3f}  (speed-up {1 / ratio:.2f}x)")
    print(f"epoch time 2 workers / 1 worker (1 CPU): {ratio_1cpu:.3f}  (speed-up {1 / ratio_1cpu:.2f}x)")
    print(f"epoch time 1 worker (2 CPUs) / in-process: {one['epoch_s'] / local['epoch_s']:.3f}")
    print(f"start-up 1 worker {one['startup_s']:.1f}s, 2 workers {two['startup_s']:.1f}s, in-process {local['startup_s']:.1f}s")
    if not args.no_write:
        members = ", ".join(config.ensemble.members)
        write_section("ray", f"""## Ray Train scaling (bench/bench_ray.py)

configs/digits.toml ({members}; {args.epochs} epochs), {cpu_name()}, {os.cpu_count()} CPUs.
Epoch = rank 0's train + validation wall time, median of epochs 2..{args.epochs} (start-up excluded).

| run | layout (groups x replicas) | epoch (s) | first epoch (s) | start-up (s) |
|---|---|---|---|---|
| 1 Ray worker, all {os.cpu_count()} CPUs (`--cpus-per-worker` default) | {one['layout']} | {one['epoch_s']:.2f} | {one['first_epoch_s']:.2f} | {one['startup_s']:.1f} |
| 1 Ray worker, 1 CPU (`--cpus-per-worker 1`) | {one_thread['layout']} | {one_thread['epoch_s']:.2f} | {one_thread['first_epoch_s']:.2f} | {one_thread['startup_s']:.1f} |
| 2 Ray workers (1 CPU each) | {two['layout']} | {two['epoch_s']:.2f} | {two['first_epoch_s']:.2f} | {two['startup_s']:.1f} |
| in-process (0 workers, torch threads) | 1x1 | {local['epoch_s']:.2f} | {local['first_epoch_s']:.2f} | {local['startup_s']:.1f} |

**epoch time 2 workers / 1 worker = {ratio:.3f}** (speed-up {1 / ratio:.2f}x) against the default 1-worker run
(all CPUs); {ratio_1cpu:.3f} (speed-up {1 / ratio_1cpu:.2f}x) against 1 worker with 1 CPU; 1 worker / in-process =
{one['epoch_s'] / local['epoch_s']:.3f}. `ray.init` {init_s:.1f}s, not included above. Command: `python bench/bench_ray.py
--epochs {args.epochs}`.

Target (issue 12): 2 workers / 1 worker <= 0.62 with 1 worker no slower than in-process. On one machine the
two halves cannot both hold: the 1-worker run already uses every core through torch's intra-op threads, here
{one_thread['epoch_s'] / one['epoch_s']:.2f}x faster than 1 thread, so even a perfect split of the work over 2 one-CPU
workers, with no communication at all, takes half the 1-thread epoch: {one_thread['epoch_s'] / 2 / one['epoch_s']:.2f} of the 1-worker
epoch, above 0.62. The target needs
workers that each bring their own cores (nodes of a cluster). What the 2-worker run pays on top: the gradient
all-reduce each step (~10 MB: the bank and coefficients), and the rank holding wrn-16-4 still generates every
block (that member reads all 43), so per-worker generation saves little on this ensemble. 1 worker reserves the
free CPUs (`--cpus-per-worker`, default shared evenly) and trains about as fast as in-process.
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())

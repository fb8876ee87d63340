"""Issue 12 measurement: `superweights compare` with one child at a time vs two at once (1 CPU per child).

The same comparison (by default what `superweights compare --config configs/digits.toml` launches; shrink it
with --seeds/--budgets/--methods) runs twice in this one process, on one local Ray started once (its start-up
and the worker processes' imports are not timed), each pass into its own fresh MLflow store in a temporary
folder (migrated before the clock starts, so the second pass reuses nothing): `--max-concurrent 1`, then
`--max-concurrent 2`. Prints both wall times, the ratio and whether the two tables are equal (they must be:
one torch thread per child either way); `--no-write` keeps them out of BENCHMARKS.md.

The default comparison is ~25 min per pass on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_section  # noqa: E402
from ray_jobs.compare import ChildResources, compare, format_markdown  # noqa: E402
from ray_jobs.compare_plan import METHODS  # noqa: E402

DEFAULT_BUDGETS = "0.1,0.25,0.5,0.83,1.0,2.0"  # `superweights compare`'s defaults
DEFAULT_SEEDS = 3


def _warm(seconds: float = 2.0) -> None:
    """A worker process's one-off cost (importing torch, Ray Train, the package), paid before the clock runs."""
    import ray.train  # noqa: F401

    import anytime.evaluate  # noqa: F401
    import ray_jobs.compare  # noqa: F401
    import ray_jobs.worker  # noqa: F401

    time.sleep(seconds)  # both at once: two processes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/digits.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS)
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--section", default="compare-concurrency", help="BENCHMARKS.md section")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    import ray
    from mlflow import MlflowClient

    from ray_jobs.driver import _init_ray

    started = _init_ray(os.environ.get("RAY_ADDRESS", ""), print)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    ray.get([ray.remote(num_cpus=1)(_warm).remote() for _ in range(2)])  # two worker processes with the imports done, for both passes
    seconds, reports, children = {}, {}, {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-compare-concurrency-") as tmp:
            uris = {n: f"sqlite:///{tmp}/c{n}/mlflow.db" for n in (1, 2)}
            for n, uri in uris.items():
                Path(tmp, f"c{n}").mkdir()
                MlflowClient(uri).search_experiments()  # create and migrate now, not inside the timed pass
            for n, uri in uris.items():
                lines = []

                def log(line, lines=lines, n=n):
                    lines.append(line)
                    print(f"  (max-concurrent {n}) {line}", flush=True)

                began = time.perf_counter()
                reports[n] = compare(args.config, args.overrides, budgets, args.seeds, methods, "bench", uri,
                                     Path(tmp, f"c{n}", "report"), log=log,
                                     resources=ChildResources(cpus=1, max_concurrent=n))
                seconds[n] = time.perf_counter() - began
                children[n] = sum(": done" in s for s in lines)
    finally:
        if started:
            ray.shutdown()
    same = format_markdown(reports[1]) == format_markdown(reports[2]) and reports[1]["rows"] == reports[2]["rows"]
    ratio = seconds[1] / seconds[2]
    command = " ".join(["python bench/bench_compare_concurrency.py", *(argv if argv is not None else sys.argv[1:])])
    shrunk = (args.budgets, args.seeds, args.methods) != (DEFAULT_BUDGETS, DEFAULT_SEEDS, ",".join(METHODS))
    what = "a slice of the default digits comparison" if shrunk else "the default digits comparison"
    body = "\n".join([
        f"## Results: compare, one child at a time vs two at once ({args.section})",
        "",
        f"Command: `{command}` ({what}: {children[1]} children, budgets {args.budgets}, {args.seeds} seed(s), "
        f"methods {args.methods}; 1 CPU and 1 torch thread per child; one local Ray of {cpus} CPUs for both passes, "
        "its start-up and the workers' imports not timed; a fresh, already migrated SQLite MLflow store per pass).",
        "",
        "| --max-concurrent | children trained | wall time | speed-up |",
        "|---|---|---|---|",
        f"| 1 | {children[1]} | {seconds[1]:.1f} s | 1.00x |",
        f"| 2 | {children[2]} | {seconds[2]:.1f} s | {ratio:.2f}x |",
        "",
        f"Same table from both passes: {'yes' if same else 'NO'} (every number).",
    ])
    print(body)
    if not args.no_write:
        write_section(args.section, body)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

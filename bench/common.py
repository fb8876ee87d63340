"""Shared helpers for benchmarks: interleaved timing, the BENCHMARKS.md section writer, and the dataset shapes the
timing benchmarks build members for (no data is read: timings do not depend on the images)."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

from ensemble.data import DatasetInfo

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
DIGITS = DatasetInfo("digits", 1, (8, 8), 10, (0.3,), (0.37,))
CIFAR = DatasetInfo("cifar10", 3, (32, 32), 10, (0.5,) * 3, (0.25,) * 3)


def interleaved(fns: dict, repeats: int, warmup: int = 2, rotate: bool = False) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so machine noise hits all of them alike; `rotate`
    shifts the order every round, so that no fn always runs after the same other one (whose data it may find
    in, or have evicted from, the caches)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        shift = i % len(names) if rotate else 0
        for k in names[shift:] + names[:shift]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def write_section(name: str, body: str) -> None:
    """Replace (or append) the `<!-- bench:name -->` section of BENCHMARKS.md."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nRatios measured side by side in one run.\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if text.count(start) > 1:  # re.sub would update every copy and hide the duplicate (tests/test_benchmarks_md.py)
        raise SystemExit(f"{BENCHMARKS} holds the section {name!r} {text.count(start)} times: remove the copies first")
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13"), else the architecture: CPU ratios depend on it (memory-bound weight
    generation against compute-bound convolutions), so every CPU table says which one measured it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()

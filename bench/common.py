"""Shared helpers for benchmarks: interleaved timing and the BENCHMARKS.md section writer."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved so machine noise hits all of them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
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

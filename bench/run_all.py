"""`make bench`: run every benchmark script under bench/ in turn; each updates its BENCHMARKS.md section (the
scripts that print only unless told get `--write`; the others write unless told `--no-write`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Arguments beyond the defaults that a BENCHMARKS.md section records in its command.
ARGS = {"bench_plain_loop.py": ["--config", "configs/cifar10-cpu.toml", "--set", "train.epochs=5", "--set",
                                "bank.unshare_epoch=0", "--threads", "2", "--vs-ours"]}


def main() -> int:
    scripts = sorted(p for p in HERE.glob("bench_*.py"))
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        flags = ["--write"] if 'add_argument("--write"' in script.read_text() else []
        command = [sys.executable, str(script), *ARGS.get(script.name, []), *flags]
        if subprocess.run(command, cwd=HERE.parent).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

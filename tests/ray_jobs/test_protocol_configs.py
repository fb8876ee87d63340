"""The shipped protocol configs (configs/*.toml) load through `superweights plan` as a user runs them from the
repo root, and their parameter counts are the ones their comments and BENCHMARKS.md quote (issue 17).

They read ../shared/data (never part of the project); skipped with the reason where it is absent."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"

# config -> (data file it needs, full-ensemble parameters, SuperWeight total parameters at the config's budget)
PROTOCOLS = {
    "cifar10-cpu.toml": (SHARED / "cifar10-jpg.tar.gz", 1_248_296, 626_473),
    "fashion-mnist-cpu.toml": (SHARED / "fashion-mnist", 1_247_144, 625_897),
    "cifar10.toml": (SHARED / "cifar10-jpg.tar.gz", 56_038_504, 28_038_698),
}


def _plan(config: str, *sets: str) -> str:
    args = [sys.executable, "-m", "ray_jobs.cli", "plan", "--config", f"configs/{config}"]
    for s in sets:
        args += ["--set", s]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _count(stdout: str, key: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith(key))
    return int(line.split()[1].replace(",", ""))


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(PROTOCOLS))
def test_protocol_config_plans_with_the_quoted_parameter_counts(config):
    needs, full, superweights = PROTOCOLS[config]
    if not needs.exists():
        pytest.skip(f"shared data {needs} absent")
    planned = _plan(config)
    assert _count(planned, "total_params") == superweights
    assert _count(planned, "full_ensemble_params") == full
    full_plan = _plan(config, 'bank.method="full"', 'bank.grouping="depth"', "bank.unshare_epoch=0")
    assert _count(full_plan, "total_params") == full
    assert superweights <= 0.6 * full  # the target budget: <= 60% of the full ensemble

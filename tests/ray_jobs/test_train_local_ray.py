"""`superweights train` as `make run` runs it: a local Ray started by the command, its output read by a user."""

import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO, TWO_MEMBERS

pytestmark = pytest.mark.slow

# Ray's C++ log lines: "[2026-12-01 07:19:23,513 E 4061 4089] core_worker.cc:2465: ..."
RAY_ERROR_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\]", re.M)


def test_local_ray_run_prints_the_results_and_no_ray_error_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local Ray, as in `make run`
    p = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "train", "--config", str(REPO / "configs/digits.toml"), "--quiet",
         "--set", TWO_MEMBERS, "--set", "train.epochs=1", "--set", "data.train_per_class=5", "--workers", "1",
         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage-path", str(tmp_path / "ray"),
         "--out", str(tmp_path / "model")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = p.stdout + p.stderr
    assert p.returncode == 0, output[-3000:]
    assert "starting a local Ray instance" in p.stdout and "ensemble (mean)" in p.stdout
    # e.g. Ray Train's preemption watcher, pointless on one machine, logged an `E core_worker` line per run
    assert not RAY_ERROR_LINE.search(output), RAY_ERROR_LINE.findall(output)
    assert "Traceback" not in output
    assert (tmp_path / "model" / "weights.safetensors").exists()

"""Ctrl-C and a killed driver, on `superweights train` with 2 real Ray workers, as a user meets them.

* SIGINT: one line naming the newest checkpoint, exit 130, MLflow run KILLED; the rerun with the same name
  resumes from that checkpoint and the epochs in MLflow continue without gaps or duplicates.
* SIGKILL of the driver: nothing can run in the dying process, so the NEXT command against the same store
  marks the run FAILED (with the reason as a tag); its checkpoints stay for a resume.

The driver joins the session cluster (`--address`), as a job on a running cluster does: its Ctrl-C must stop
the Ray Train controller and workers it owns there, which no process-group signal reaches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ensemble.train_state import latest_complete

from .conftest import REPO, TWO_MEMBERS

pytestmark = pytest.mark.slow

SUPERWEIGHTS = str(Path(sys.executable).with_name("superweights"))
TINY = ["--set", TWO_MEMBERS, "--set", "data.train_per_class=60", "--set", "train.batch_size=100",
        "--set", "train.lr=0.005"]


def _train(name: str, tmp_path: Path, ray_cluster: dict, mlflow_uri: str, epochs: int, *extra: str) -> list[str]:
    return [SUPERWEIGHTS, "train", *TINY, "--set", f"train.epochs={epochs}", "--name", name,
            "--storage-path", str(tmp_path / "ray"), "--out", str(tmp_path / name), "--tracking-uri", mlflow_uri,
            "--address", ray_cluster["gcs"], *extra]


def _signal_at_checkpoint(cmd: list[str], run_dir: Path, epoch: int, sig: int, log: Path,
                          timeout: float = 240) -> tuple[int, int, str]:
    """Start `cmd` in its own session, send `sig` to it once epoch `epoch`'s checkpoint is complete; returns
    (pid, exit code, output). Whatever is left of its process group is killed at the end."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    want = run_dir / f"checkpoint_epoch_{epoch:04d}" / "train_state.json"
    deadline = time.monotonic() + timeout
    try:
        while not want.is_file():
            assert proc.poll() is None, f"training ended (rc {proc.returncode}) before epoch {epoch}'s checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint for epoch {epoch} after {timeout:.0f}s"
            time.sleep(0.1)
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.pid, code, log.read_text()


def _run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("superweights")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`superweights.run_name` = '{name}'")
    return run


def _newest_complete_epoch(run_dir: Path) -> int:
    return json.loads((latest_complete(run_dir) / "train_state.json").read_text())["epoch"]


def test_ctrl_c_ends_killed_in_one_line_and_the_rerun_resumes_from_the_newest_checkpoint(
        ray_cluster, mlflow_uri, tmp_path):
    name, epochs = "interrupted", 12
    run_dir = tmp_path / "ray" / name
    _, code, log = _signal_at_checkpoint(_train(name, tmp_path, ray_cluster, mlflow_uri, epochs), run_dir, 3,
                                         signal.SIGINT, tmp_path / "first.log")
    ours = [line for line in log.splitlines() if line.startswith("superweights:")]
    assert code == 130, log
    newest = _newest_complete_epoch(run_dir)
    assert newest >= 3
    assert ours == [f"superweights: interrupted: run {name} stopped (MLflow run KILLED); its newest checkpoint is "
                    f"epoch {newest} ({run_dir / f'checkpoint_epoch_{newest:04d}'}): rerun with --name {name} to "
                    "resume from there"], log
    assert "Traceback" not in log
    client = MlflowClient(mlflow_uri)
    run = _run(client, name)
    assert run.info.status == "KILLED"

    # The controller and its workers stopped with the driver: nothing trains on, and no new checkpoint appears.
    time.sleep(3)
    assert _newest_complete_epoch(run_dir) == newest

    second = subprocess.run(_train(name, tmp_path, ray_cluster, mlflow_uri, epochs), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"checkpoint_epoch_{newest:04d} at epoch {newest}/{epochs}" in second.stdout, second.stdout
    assert f"epoch {newest:3d}/{epochs}" not in second.stdout  # the newest epoch is not trained again
    state = json.loads((run_dir / f"checkpoint_epoch_{epochs:04d}" / "train_state.json").read_text())
    assert state["resumes"] == [newest]
    assert [row["epoch"] for row in state["history"]] == list(range(1, epochs + 1))
    run = _run(client, name)  # the same MLflow run, FINISHED, each epoch once
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(1, epochs + 1))


def test_a_driver_killed_with_sigkill_is_marked_failed_by_the_next_command(ray_cluster, mlflow_uri, tmp_path):
    name = "killed-driver"
    run_dir = tmp_path / "ray" / name
    pid, _, _ = _signal_at_checkpoint(_train(name, tmp_path, ray_cluster, mlflow_uri, 30), run_dir, 2,
                                      signal.SIGKILL, tmp_path / "killed.log")
    client = MlflowClient(mlflow_uri)
    run = _run(client, name)
    assert run.info.status == "RUNNING"  # nobody could close it
    assert run.data.tags["superweights.driver_pid"] == str(pid)

    # The next command: any training against the same store (here a 1-epoch in-process run of another name).
    nxt = subprocess.run([SUPERWEIGHTS, "train", *TINY, "--set", "train.epochs=1", "--workers", "0", "--name",
                          "next-command", "--storage-path", str(tmp_path / "ray"), "--out", str(tmp_path / "next"),
                          "--tracking-uri", mlflow_uri], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert nxt.returncode == 0, nxt.stdout[-3000:] + nxt.stderr[-3000:]
    run = _run(client, name)
    assert run.info.status == "FAILED"
    assert run.data.tags["superweights.failure"] == (
        f"driver process {pid} on {run.data.tags['superweights.driver_host']} ended without closing this run "
        f"(killed?); rerun with --name {name} to resume from its newest checkpoint")
    assert f"marked MLflow run {run.info.run_id} ({name}) FAILED: its driver process {pid} is gone" in nxt.stdout
    assert _run(client, "next-command").info.status == "FINISHED"  # a live driver's run is left alone
    assert (run_dir / "checkpoint_epoch_0002" / "train_state.json").is_file()  # kept for the resume


def test_sigterm_like_ray_job_stop_ends_killed_in_one_line(ray_cluster, mlflow_uri, tmp_path):
    """`kill` / `ray job stop` send SIGTERM; `ray.init` replaces a Python SIGTERM handler with its own (a C++
    stack dump and exit -6), so ours is set again after it."""
    name = "terminated"
    run_dir = tmp_path / "ray" / name
    _, code, log = _signal_at_checkpoint(_train(name, tmp_path, ray_cluster, mlflow_uri, 30), run_dir, 2,
                                         signal.SIGTERM, tmp_path / "term.log")
    ours = [line for line in log.splitlines() if line.startswith("superweights:")]
    assert code == 130 and len(ours) == 1, log
    assert ours[0].startswith(f"superweights: interrupted: run {name} stopped (MLflow run KILLED)")
    assert "SIGTERM received" not in log
    assert _run(MlflowClient(mlflow_uri), name).info.status == "KILLED"

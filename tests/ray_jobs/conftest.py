"""Session fixtures for the Ray / MLflow tests: ONE local Ray cluster and ONE SQLite MLflow store.

The cluster is a real `ray start --head --block --num-cpus=2` on 127.0.0.1 with explicit ports and the
dashboard (job submission needs it; it also keeps Ray's state API up). In-process tests connect to it
with `ray.init(address=...)`; the job test submits to it with the `ray job submit` CLI. It is stopped in a
finally by signalling the process group this fixture started, not with `ray stop`, which would stop
every Ray process on the machine, including other sessions' clusters.
A worker-group start costs ~20 s on 2 cores, a fresh MLflow SQLite store ~10 s: both are shared.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

# Ray >= 2.59 turns token auth on for local clusters; loopback tests run without it, on both sides.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # notice a finished/failed worker sooner
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Tiny digits configs (seconds per epoch). The single-process comparisons use runs whose training is well
# conditioned: on this data a 1e-7 relative nudge of the weights can grow to 1e-4..1e-2 after ~10 SGD steps
# (measured), so "equal within 1e-5" is only a meaningful test where the dynamics do not amplify rounding.
TWO_MEMBERS = 'ensemble.members=["wrn-10-1","wrn-10-2"]'


def set_args(*overrides: str) -> list[str]:
    """`--set A --set B ...` for `superweights train`."""
    return [a for o in overrides for a in ("--set", o)]


def train_refusal(capsys, storage, *overrides: str) -> str:
    """`superweights train --workers 0` with `overrides` must refuse in one line with exit 2; that line."""
    from ray_jobs import cli

    code = cli.main(["train", "--workers", "0", "--no-tracking", "--storage-path", str(storage), *set_args(*overrides)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    return err


def write_image_folder(root: Path, counts: dict[str, int], side: int = 8) -> Path:
    """An image folder of two classes (red, blue) of `side` x `side` PNGs, `counts[split]` per class and split,
    each image a slightly different shade (root/split/class/i.png)."""
    from PIL import Image

    for split, n in counts.items():
        for c, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (side, side), tuple(min(255, v + 5 * i) for v in colour)).save(root / split / c / f"{i}.png")
    return root


def free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """`ray start --head` on loopback; yields {"gcs": host:port, "dashboard": http url}."""
    ports = {name: free_port() for name in ("port", "node-manager-port", "object-manager-port",
                                             "ray-client-server-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                             "metrics-export-port")}
    dashboard = free_port(8265)
    log = tmp_path_factory.mktemp("ray") / "ray_start.log"
    # A private temp dir: `ray start` writes its address to <temp dir>/ray_current_cluster, where a plain
    # `ray.init()` of any other session on this machine would otherwise find (and join) this cluster.
    # Short: Ray's unix sockets live under it (path limit ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="swray-", dir="/tmp")
    cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp_dir}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    info = {"gcs": f"127.0.0.1:{ports['port']}", "dashboard": f"http://127.0.0.1:{dashboard}", "pid": proc.pid}
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(info["dashboard"] + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray dashboard did not come up in 90 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield info
    finally:
        _stop_cluster(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _session_pids(sid: int) -> list[int]:
    """Processes of the session `ray start` was started in (actors get their own process group)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
                pids.append(int(d.name))
    return pids


def _stop_cluster(proc: subprocess.Popen) -> None:
    """Stop exactly the cluster this fixture started: SIGTERM to its process group, a short grace period,
    then SIGKILL to every process left in its session (GCS and raylet ignore a quick SIGTERM)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for _ in range(3):
        left = [p for p in _session_pids(proc.pid) if p != os.getpid()]
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="session")
def ray_connected(ray_cluster):
    """This test process as a Ray driver of the session cluster."""
    import ray

    ray.init(address=ray_cluster["gcs"], logging_level="WARNING")
    try:
        yield ray_cluster
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the session (a fresh one spends ~10 s on migrations)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = "sqlite:///" + str(folder / "mlflow.db")
    MlflowClient(uri).search_experiments()  # creates and migrates the DB now
    return uri


def mlflow_run(uri: str, run_id: str):
    from mlflow import MlflowClient

    return MlflowClient(uri).get_run(run_id)


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


JOB_EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlartifacts", "*.db", "data", "__pycache__", ".pytest_cache",
                ".ruff_cache", "*.egg-info", "compare"]


def submit_job(ray_cluster: dict, entry: list[str], timeout: float = 240) -> tuple[str, str, str]:
    """`ray job submit --no-wait --working-dir .` of `entry` on the session cluster, then wait (bounded) for
    it to end; returns (job id, final status, logs). A job still running at the deadline is stopped."""
    import json

    from ray.job_submission import JobStatus, JobSubmissionClient

    submit = subprocess.run(
        [RAY, "job", "submit", "--address", ray_cluster["dashboard"], "--no-wait", "--working-dir", ".",
         "--runtime-env-json", json.dumps({"excludes": JOB_EXCLUDES}), "--", *entry],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = next(w.strip("'") for w in (submit.stdout + submit.stderr).split() if w.strip("'").startswith("raysubmit_"))
    client = JobSubmissionClient(ray_cluster["dashboard"])
    ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    deadline = time.monotonic() + timeout
    status = client.get_job_status(job_id)
    while status not in ended and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if status not in ended:
        client.stop_job(job_id)
    return job_id, str(status), logs

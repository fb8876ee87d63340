"""Submitted jobs keep their files: in Ray's temporary copy of the working directory, outputs that would be
deleted with it (relative or default --out / --storage-path / tracking URI) are refused before training.

The fast tests fake Ray's layout (`<temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_*`);
the slow one submits a real job to the session cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import SuperweightsError
from ray_jobs.durable import in_temporary_working_dir, require_durable, temporary_working_dir
from ray_jobs.train import add_train_arguments, run_from_args

from .conftest import REPO, TWO_MEMBERS, submit_job

PREFIX = "this job runs in Ray's temporary copy of the working directory ("
ALL = ("--out", "--storage-path", "--tracking-uri")
# What Ray prints when something is wrong; a submitted job should print none of it.
RAY_ERROR = re.compile(r"PreemptionWatcher|Found multiple active Ray instances|^E |ERROR|Traceback", re.M)


def fake_job_dir(root: Path, temp_dir: str = "ray") -> Path:
    """Ray's layout of a job's working directory copy under `root/<temp_dir>`."""
    pkg = (root / temp_dir / "session_2026-01-02_03-04-05_123456_789" / "runtime_resources" / "working_dir_files"
           / "_ray_pkg_0123456789abcdef")
    (pkg / "ray_jobs").mkdir(parents=True)
    return pkg


@pytest.fixture
def job_dir(tmp_path, monkeypatch) -> Path:
    pkg = fake_job_dir(tmp_path)
    monkeypatch.chdir(pkg)
    return pkg


def refusal(paths: dict) -> str:
    with pytest.raises(SuperweightsError) as e:
        require_durable(paths)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_an_ordinary_folder_is_not_a_temporary_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not in_temporary_working_dir() and temporary_working_dir() is None
    require_durable({"--out": None, "--storage-path": "runs/ray", "--tracking-uri": None})  # does nothing
    # a folder that is only *called* runtime_resources, outside a Ray session
    (tmp_path / "runtime_resources" / "working_dir_files" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runtime_resources" / "working_dir_files" / "x")
    assert not in_temporary_working_dir()


@pytest.mark.parametrize("temp_dir", ["ray", "swray-abc123"])  # /tmp/ray or a cluster's --temp-dir
def test_ray_job_working_dir_is_detected(tmp_path, monkeypatch, temp_dir):
    pkg = fake_job_dir(tmp_path, temp_dir)
    monkeypatch.chdir(pkg)
    assert in_temporary_working_dir() and temporary_working_dir() == pkg.resolve()
    monkeypatch.chdir(pkg / "ray_jobs")  # an entrypoint that cd's into a subfolder of the copy
    assert in_temporary_working_dir() and temporary_working_dir() == pkg.resolve()


def test_detection_follows_links(tmp_path, monkeypatch):
    """Ray's `session_latest` is a link to the session folder; a link to the copy is the copy."""
    pkg = fake_job_dir(tmp_path)
    (tmp_path / "link").symlink_to(pkg)
    monkeypatch.chdir(tmp_path / "link")
    assert temporary_working_dir() == pkg.resolve()
    assert temporary_working_dir(tmp_path) is None


def test_default_outputs_are_refused_in_one_line_naming_every_option(job_dir):
    message = refusal({"--out": None, "--storage-path": None, "--tracking-uri": None})
    assert message == (
        f"{PREFIX}{job_dir.resolve()}), which Ray may delete any time after the job ends, and --out, --storage-path and "
        "--tracking-uri were not given, so they would land in it: pass absolute --out, --storage-path and "
        "--tracking-uri (paths every node can reach, e.g. on NFS; a tracking URI as sqlite:////abs/path/mlflow.db "
        "or http(s)://server)"
    )


@pytest.mark.parametrize("value", ["runs/x", "./out", "mlflow.db", "sqlite:///mlflow.db", "sqlite:///:memory:",
                                   "file:runs", ""])
def test_relative_values_are_refused(job_dir, value):
    message = refusal({"--out": value})
    assert message.startswith(PREFIX) and "pass absolute --out (paths every node can reach" in message
    assert "tracking URI" not in message  # the hint only where a tracking URI is asked for
    if value:
        assert f"--out {value} is relative" in message


def test_absolute_paths_inside_the_copy_are_refused(job_dir):
    inside = str(job_dir / "runs")
    message = refusal({"--out": "/data/out", "--storage-path": inside,
                       "--tracking-uri": f"sqlite:///{job_dir}/mlflow.db"})
    assert f"--storage-path {inside} lies in Ray's runtime_resources" in message
    assert f"--tracking-uri sqlite:///{job_dir}/mlflow.db lies in Ray's runtime_resources" in message
    assert "pass absolute --storage-path and --tracking-uri (" in message and "--out" not in message


def test_mixed_reasons_read_as_one_sentence(job_dir):
    message = refusal({"--out": "out", "--storage-path": "/nfs/ckpt", "--tracking-uri": None})
    assert "and --tracking-uri was not given and --out out is relative, so they would land in it: pass absolute " \
           "--out and --tracking-uri (" in message


@pytest.mark.parametrize("value", ["/nfs/runs", "~/runs", "s3://bucket/runs", "gs://bucket/runs",
                                   "http://mlflow:5000", "https://mlflow.example.com", "databricks",
                                   "postgresql://u@db/mlflow", "file:///nfs/runs", "sqlite:////nfs/mlflow.db",
                                   "sqlite:////nfs/mlflow.db?timeout=30"])
def test_absolute_paths_and_uris_are_durable(job_dir, value):
    require_durable({"--tracking-uri": value})
    if value != "databricks":  # MLflow's name for a Databricks workspace; as --out, a relative folder
        require_durable({"--out": value})
    else:
        assert "--out databricks is relative" in refusal({"--out": value})


def test_an_absolute_path_in_another_ray_session_is_refused(job_dir, tmp_path):
    """Anything under a session's runtime_resources is Ray's cache, not only this job's copy."""
    other = fake_job_dir(tmp_path / "other")
    assert "lies in Ray's runtime_resources" in refusal({"--out": str(other)})


def parse(*argv):
    import argparse

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p.parse_args(argv)


def test_train_refuses_before_loading_anything(job_dir, monkeypatch):
    import ray_jobs.driver

    monkeypatch.setattr(ray_jobs.driver, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SuperweightsError, match=r"--out, --storage-path and --tracking-uri were not given"):
        run_from_args(parse(), log=lambda s: None)
    with pytest.raises(SuperweightsError, match=r"and --storage-path were not given.*pass absolute --out and "
                                                r"--storage-path \(paths every node can reach, e\.g\. on NFS\)$"):
        run_from_args(parse("--no-tracking"), log=lambda s: None)  # no tracking URI needed
    assert sorted(os.listdir(job_dir)) == ["ray_jobs"]


def test_train_with_durable_outputs_goes_ahead(job_dir, tmp_path, monkeypatch):
    import ray_jobs.driver

    class Started(Exception):
        pass

    def fake_train(config, options, **kw):
        raise Started(options.storage_path, kw["out"], kw["tracking_uri"])

    monkeypatch.setattr(ray_jobs.driver, "train", fake_train)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(Started) as e:
        run_from_args(parse("--out", str(tmp_path / "out"), "--storage-path", "s3://bucket/ray", "--tracking-uri", uri),
                      log=lambda s: None)
    assert e.value.args == ("s3://bucket/ray", str(tmp_path / "out"), uri)


def test_job_entrypoint_exits_2_with_the_one_line_and_writes_nothing(tmp_path):
    """`python -m ray_jobs.train` as Ray runs it: cwd = the (fake) copy, code from PYTHONPATH."""
    pkg = fake_job_dir(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--set", TWO_MEMBERS, "--workers", "2"],
                       cwd=pkg, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"superweights: error: {PREFIX}{pkg.resolve()})"), p.stderr
    assert "pass absolute --out, --storage-path and --tracking-uri (" in lines[0]
    assert sorted(os.listdir(pkg)) == ["ray_jobs"]  # no runs/, mlflow.db, mlartifacts/
    assert not RAY_ERROR.search(p.stdout + p.stderr.replace(lines[0], ""))
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_submitted_job_without_durable_outputs_fails_at_once_in_one_line(ray_cluster):
    """The real `ray job submit --working-dir .` with no --out / --storage-path / --tracking-uri: FAILED within
    seconds of starting, the logs hold the one line and no traceback, and no Ray error lines."""
    from ray.job_submission import JobSubmissionClient

    entry = [sys.executable, "-m", "ray_jobs.train", "--set", "data.train_per_class=10", "--set", TWO_MEMBERS,
             "--set", "train.epochs=1", "--workers", "2"]
    job_id, status, logs = submit_job(ray_cluster, entry, timeout=120)
    assert status == "FAILED", logs[-3000:]
    client = JobSubmissionClient(ray_cluster["dashboard"])
    info = client.get_job_info(job_id)
    assert info.end_time - info.start_time < 30_000, info  # ms: import + config, no Ray Train start
    errors = [line for line in logs.splitlines() if line.startswith("superweights: error: ")]
    assert len(errors) == 1, logs[-3000:]
    assert errors[0].startswith(f"superweights: error: {PREFIX}")
    copy = errors[0][len(f"superweights: error: {PREFIX}"):].split(")", 1)[0]
    assert "/runtime_resources/working_dir_files/_ray_pkg_" in copy, errors[0]
    assert "pass absolute --out, --storage-path and --tracking-uri (" in errors[0]
    assert not RAY_ERROR.search(logs.replace(errors[0], "")), logs[-3000:]
    assert not Path(copy, "mlflow.db").exists() and not Path(copy, "runs").exists()

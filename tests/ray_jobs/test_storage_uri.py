"""`--storage-path` / `--out` as URIs (s3://, gs://, file://: what `pyarrow.fs` and Ray Train's storage open).

There is no network here, so the end-to-end runs use `file:///abs/path` URIs: pyarrow's filesystem opened
from a URI, the code path an s3:// or gs:// run takes (the driver never treats a file:// URI as a local path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import SuperweightsError
from ensemble.config import load_config
from ensemble.loop import fit
from ensemble.train_state import STATE_FILE
from ray_jobs import cli
from ray_jobs.driver import RayOptions, train
from ray_jobs.storage_uri import Location, is_complete, latest_complete, location

from .conftest import TWO_MEMBERS, metric_steps, mlflow_run

TINY = ["data.train_per_class=10", TWO_MEMBERS, "train.batch_size=50"]


def _checkpoint(folder: Path, epoch: int, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    sizes = {name: len(data) for name, data in files.items()}
    (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch, "files": sizes}))


def test_plain_paths_stay_paths_and_uris_keep_their_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = location("runs")
    assert plain.uri is None and plain.local == tmp_path / "runs" and plain.native == tmp_path / "runs"
    assert location("~/x").path == str(Path.home() / "x")

    uri = location(f"file://{tmp_path}/runs")
    assert uri.local is None and uri.native is uri and uri.path == f"{tmp_path}/runs"
    # a run name is percent-encoded in the URI and decoded back to the same folder by pyarrow (and Ray)
    run = uri / "my run 50%"
    assert str(run) == f"file://{tmp_path}/runs/my%20run%2050%25"
    assert location(str(run)).path == f"{tmp_path}/runs/my run 50%"
    # a URI's query (s3://b/p?region=x) stays at its end; building the name needs no network
    s3 = Location(uri.fs, "b/p", "s3://b/p?region=eu-west-1") / "r"
    assert (str(s3), s3.path, s3.name) == ("s3://b/p/r?region=eu-west-1", "b/p/r", "r")
    with pytest.raises(TypeError, match="is a URI, not a local path"):
        os.fspath(run)  # open(uri) would read a local file of that name
    with pytest.raises(ValueError, match="plain file or folder name"):
        uri / "a/b"


@pytest.mark.parametrize("value", ["nosuch://bucket/runs", "file://host/runs", "file:relative/runs", "s3:/bucket",
                                   "://runs", "file:///tmp/a b"])
def test_a_uri_pyarrow_cannot_open_is_one_line_naming_the_option(value):
    with pytest.raises(SuperweightsError) as e:
        location(value, "--storage-path")
    message = str(e.value)
    assert message.startswith(f"--storage-path {value!r} is not a storage URI pyarrow can open (")
    assert "\n" not in message


def test_complete_checkpoints_are_found_through_the_filesystem(tmp_path):
    run = location(f"file://{tmp_path}/run")
    assert latest_complete(run) is None  # no run folder yet
    _checkpoint(tmp_path / "run" / "checkpoint_epoch_0001", 1, {"weights.safetensors": b"x" * 10})
    _checkpoint(tmp_path / "run" / "checkpoint_epoch_0002", 2, {"weights.safetensors": b"y" * 10})
    (tmp_path / "run" / "checkpoint_epoch_0003").mkdir()  # an upload that never got to train_state.json
    assert latest_complete(run).name == "checkpoint_epoch_0002"
    (tmp_path / "run" / "checkpoint_epoch_0002" / "weights.safetensors").write_bytes(b"y" * 4)  # cut short
    assert not is_complete(run / "checkpoint_epoch_0002")
    assert latest_complete(run).name == "checkpoint_epoch_0001"

    # upload (train_state.json last) and a file copy between filesystems, as for an in-process run and --out
    src = tmp_path / "local"
    _checkpoint(src, 5, {"a.json": b"{}", "b.bin": b"123"})
    (run / "checkpoint_epoch_0005").upload(src)
    assert is_complete(run / "checkpoint_epoch_0005") and latest_complete(run).name == "checkpoint_epoch_0005"
    (run / "checkpoint_epoch_0005" / "b.bin").copy_to(location(tmp_path / "out") / "b.bin")
    assert (tmp_path / "out" / "b.bin").read_bytes() == b"123"
    assert (run / "checkpoint_epoch_0005" / STATE_FILE).read_json()["epoch"] == 5


@pytest.mark.parametrize("option", ["--storage-path", "--out"])
def test_train_refuses_an_unknown_scheme_in_one_line_before_anything_starts(capsys, tmp_path, option):
    import ray

    was_up = ray.is_initialized()
    paths = {"--storage-path": str(tmp_path / "runs"), "--out": str(tmp_path / "out"), option: "nosuch://bucket/x"}
    code = cli.main(["train", "--set", TWO_MEMBERS, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                     *[a for kv in paths.items() for a in kv]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"superweights: error: {option} 'nosuch://bucket/x' is not a storage URI") and "\n" not in err
    assert ray.is_initialized() == was_up and not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_in_process_run_on_uris_crashes_resumes_and_evaluates(tmp_path, mlflow_uri, capsys):
    """0 workers: Ray's local mode persists nothing, so the loop writes each checkpoint locally and uploads it
    to the storage URI; a crash leaves the uploaded ones, and a rerun of `superweights train` with the same
    name downloads the newest and finishes the same MLflow run. --out is a URI too; the model folder it names
    is what `superweights evaluate` reads, and the printed paths are the URIs."""
    from ray_jobs.worker import InjectedCrash

    storage, out = f"file://{tmp_path}/store", f"file://{tmp_path}/model"
    config = load_config(None, [*TINY, "train.epochs=3"])
    with pytest.raises(InjectedCrash):
        train(config, RayOptions(workers=0, storage_path=storage, crash_at_epoch=3), name="uri run",
              out=out, tracking_uri=mlflow_uri, log=lambda s: None)
    run_dir = tmp_path / "store" / "uri run"
    record = json.loads((run_dir / "superweights_run.json").read_text())
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0001",
                                                                          "checkpoint_epoch_0002"]
    assert mlflow_run(mlflow_uri, record["mlflow_run_id"]).info.status == "FAILED"

    sets = [a for s in [*TINY, "train.epochs=3"] for a in ("--set", s)]
    assert cli.main(["train", *sets, "--workers", "0", "-q", "--name", "uri run", "--storage-path", storage,
                     "--out", out, "--tracking-uri", mlflow_uri]) == 0
    printed = capsys.readouterr().out
    assert f"resuming uri run: checkpoints in {storage}/uri%20run" in printed
    assert f"model files: {out}\n" in printed
    assert f"checkpoint:  {storage}/uri%20run/checkpoint_epoch_0003\n" in printed
    assert "resumed from" in printed and "at epoch 2/3" in printed
    state = json.loads((run_dir / "checkpoint_epoch_0003" / STATE_FILE).read_text())
    assert state["resumes"] == [2] and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert mlflow_run(mlflow_uri, record["mlflow_run_id"]).info.status == "FINISHED"
    assert metric_steps(mlflow_uri, record["mlflow_run_id"], "train_loss") == [1, 2, 3]  # no duplicate epochs

    ref = fit(config, None, progress=False, log=lambda s: None)  # the resumed run is the uninterrupted one
    weights = load_file(str(tmp_path / "model" / "weights.safetensors"))
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert {"weights.safetensors", "plan.json", "config.json", "metrics.json", "anytime.json"} <= {
        p.name for p in (tmp_path / "model").iterdir()}
    assert cli.main(["evaluate", str(tmp_path / "model"), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())


@pytest.mark.slow
def test_superweights_train_on_ray_workers_with_uri_storage_recovers_and_resumes(ray_cluster, mlflow_uri, tmp_path):
    """`superweights train` with its default workers (2) on the session cluster, storage and --out as URIs:
    Ray Train uploads the worker group's checkpoints to the URI and, after the injected crash, restarts the
    group from the one it finds there; a second call with more epochs continues the run from the newest."""
    storage, out = f"file://{tmp_path}/store", f"file://{tmp_path}/model"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["gcs"]}

    def superweights_train(epochs: int, *extra: str) -> str:
        sets = [a for s in [*TINY, f"train.epochs={epochs}"] for a in ("--set", s)]
        p = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "train", *sets, "-q", "--name", "ray-uri",
                            "--storage-path", storage, "--out", out, "--tracking-uri", mlflow_uri, *extra],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        return p.stdout + p.stderr

    first = superweights_train(2, "--crash-at-epoch", "2")
    # Ray prints the failed worker's traceback: the injected crash's, and no other
    assert first.count("Traceback") == first.count("InjectedCrash: debug.crash_at_epoch=2") >= 1, first[-4000:]
    assert "parallelism: 2 Ray workers" in first
    assert f"checkpoint:  {storage}/ray-uri/checkpoint_epoch_0002\n" in first and f"model files: {out}\n" in first
    run_dir = tmp_path / "store" / "ray-uri"
    assert (run_dir / ".crash_injected_epoch_2").is_file()  # it did crash once ...
    state = json.loads((run_dir / "checkpoint_epoch_0002" / STATE_FILE).read_text())
    assert state["resumes"] == [1]  # ... and the restarted group resumed from the epoch-1 checkpoint

    second = superweights_train(3)
    assert "Traceback" not in second
    assert f"resuming ray-uri: checkpoints in {storage}/ray-uri" in second
    assert f"checkpoint:  {storage}/ray-uri/checkpoint_epoch_0003\n" in second
    state = json.loads((run_dir / "checkpoint_epoch_0003" / STATE_FILE).read_text())
    assert state["resumes"] == [1, 2] and [h["epoch"] for h in state["history"]] == [1, 2, 3]
    run_id = json.loads((run_dir / "superweights_run.json").read_text())["mlflow_run_id"]
    assert mlflow_run(mlflow_uri, run_id).info.status == "FINISHED"
    assert metric_steps(mlflow_uri, run_id, "train_loss") == [1, 2, 3]
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["split"] == "test"
    assert cli.main(["evaluate", str(tmp_path / "model"), "--out", str(tmp_path / "eval")]) == 0

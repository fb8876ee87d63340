"""Ray Train on a real local cluster (2 CPU workers), MLflow in SQLite, and the Ray Jobs entrypoint.

Each test starts one worker group (~20 s here), so the configs are tiny: digits, 10-20 images per class,
wrn-10-1 + wrn-10-2, a few epochs of a few steps.
"""

from __future__ import annotations

import re
import sys
import time

import pytest
from safetensors.torch import load_file

from core.errors import SuperweightsError
from ensemble.config import load_config
from ensemble.data import load_data
from ensemble.loop import fit
from ray_jobs.driver import RayOptions, train

from .conftest import TWO_MEMBERS, metric_steps, mlflow_run, submit_job

pytestmark = pytest.mark.slow

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_accuracy", "val_nll", "epoch_seconds", "train_seconds")


def assert_same_weights(checkpoint, model, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every tensor of the state dict (parameters and BN running statistics): ||a - b|| <= rtol ||b|| + atol.

    `atol`: batch-norm biases start at 0 and stay ~1e-3 in these short runs, so a rounding-level difference
    (1e-7 absolute, e.g. matmul blocking that depends on memory alignment in the in-process reference) is
    1e-4 *relative* there; one SGD step at these learning rates moves a weight by ~1e-5 or more, so a real
    difference (a lost or repeated step) is still far above 1e-6."""
    got = load_file(str(checkpoint / "weights.safetensors"))
    ref = model.state_dict()
    assert sorted(got) == sorted(ref)
    for name, b in ref.items():
        diff = float((got[name].double() - b.double()).norm())
        assert diff <= rtol * float(b.double().norm()) + atol, (name, diff, float(b.double().norm()))


def test_more_workers_than_the_cluster_has_cpus_is_refused_at_once(ray_connected, tmp_path):
    """Ray would wait forever for a 3rd CPU: the driver asks the cluster first and refuses in one line."""
    config = load_config(None, [TWO_MEMBERS])
    start = time.monotonic()
    with pytest.raises(SuperweightsError, match=r"^3 workers need 3 CPUs but the Ray cluster has 2: use --workers <= 2"):
        train(config, RayOptions(workers=3, storage_path=str(tmp_path)), track=False, log=lambda s: None)
    assert time.monotonic() - start < 10
    assert not any(tmp_path.iterdir())


def test_member_parallel_two_workers_equal_single_process(ray_connected, mlflow_uri, tmp_path):
    """2 member groups (wrn-10-2 | wrn-10-1 by FLOPs), 8 steps: the weights of single-process `fit`."""
    config = load_config(None, ["data.train_per_class=20", TWO_MEMBERS, "train.batch_size=64", "train.epochs=2",
                                "train.lr=0.005"])
    out = train(config, RayOptions(workers=2, storage_path=str(tmp_path / "runs"), checkpoint_every=2),
                name="member-parallel", tracking_uri=mlflow_uri, log=lambda s: None)
    assert (out.layout.member_groups, out.layout.data_replicas) == (2, 1)
    assert out.layout.groups == ((1,), (0,))  # the bigger member alone in group 0
    ref = fit(config, None, progress=False, log=lambda s: None)
    assert_same_weights(out.checkpoint, ref.model)
    for mine, theirs in zip(out.history, ref.history):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"])
        assert mine["val_accuracy"] == pytest.approx(theirs["val_accuracy"])
    assert out.metrics["ensemble"]["accuracy"] == pytest.approx(ref.metrics["ensemble"]["accuracy"])
    assert mlflow_run(mlflow_uri, out.mlflow_run_id).info.status == "FINISHED"


def test_data_parallel_two_workers_equal_single_process_with_an_empty_slice(ray_connected, mlflow_uri, tmp_path):
    """2 data replicas of one member group on the same global batches: batch 62 over 125 images leaves a
    last batch of 1, so replica 1 trains on an EMPTY slice there. Early exits on (their heads use
    BatchNorm1d, synchronised too). Equal to the single-process batches.

    Row-major: the synchronised statistics are float64 sums, and PyTorch's float32 batch norm on channels_last
    inputs (the default layout) is ~8x less exact than on row-major ones (max error 2.6e-6 against 3.3e-7 on a
    62x32x8x8 batch, measured), so under channels_last the single-process reference itself drifts from the
    exact statistics by 4e-4 relative in this epoch's 3 steps: too coarse to tell a lost step from rounding."""
    config = load_config(None, ["data.test_fraction=0.9", "data.val_fraction=0.3", "train.batch_size=62",
                                TWO_MEMBERS, "train.epochs=1", 'ensemble.exits="all"', "train.channels_last=false"])
    t = config.train
    assert load_data(config.data, t.seed, t.batch_size, t.eval_batch_size).train.num_examples == 2 * 62 + 1
    out = train(config, RayOptions(workers=2, member_groups=1, storage_path=str(tmp_path / "runs")),
                name="data-parallel", tracking_uri=mlflow_uri, log=lambda s: None)
    assert (out.layout.member_groups, out.layout.data_replicas) == (1, 2)
    ref = fit(config, None, progress=False, log=lambda s: None)
    assert_same_weights(out.checkpoint, ref.model)
    for mine, theirs in zip(out.history, ref.history):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"])


def test_worker_crash_resumes_from_last_checkpoint_without_losing_or_repeating_epochs(ray_connected, mlflow_uri,
                                                                                       tmp_path):
    """Checkpoints at epochs 2 and 4; worker 1 raises in the middle of epoch 4 (first attempt only), after
    epoch 3 was logged but not checkpointed. Ray restarts the group from the epoch-2 checkpoint; epoch 3 is
    trained again (same numbers, not logged twice), and the result equals uninterrupted training."""
    from mlflow import MlflowClient

    # Two full batches per epoch (batch 100, 200 images): a last batch of 8 makes BatchNorm amplify the
    # all-reduce's rounding differences to ~1e-4 in 16 steps (measured), too coarse for a 1e-5 equality.
    config = load_config(None, ["data.train_per_class=20", TWO_MEMBERS, "train.batch_size=100", "train.epochs=4",
                                "train.lr=0.005"])
    storage = tmp_path / "runs"
    out = train(config, RayOptions(workers=2, storage_path=str(storage), checkpoint_every=2, max_failures=1,
                                   crash_at_epoch=4),
                name="crash", tracking_uri=mlflow_uri, out=tmp_path / "out", log=lambda s: None)
    assert (storage / "crash" / ".crash_injected_epoch_4").is_file()  # it did crash once
    assert out.extra["resumes"] == [2]  # ... and resumed at the epoch-2 checkpoint, not from scratch
    assert [h["epoch"] for h in out.history] == [1, 2, 3, 4]
    ref = fit(config, None, progress=False, log=lambda s: None)
    # atol 5e-6: on some x86 CPUs a BatchNorm bias of norm ~3e-3 ends 1.5e-6 away from single-process training
    # (member-parallel gradient sums round differently, measured 2026-12-02); one epoch lost or repeated moves
    # such a bias by ~1e-4 (2 steps at lr 0.005), and the loss history below checks every epoch to 1e-5.
    assert_same_weights(out.checkpoint, ref.model, atol=5e-6)
    assert [h["train_loss"] for h in out.history] == pytest.approx([h["train_loss"] for h in ref.history], rel=1e-5)

    run = mlflow_run(mlflow_uri, out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert metric_steps(mlflow_uri, out.mlflow_run_id, key) == [1, 2, 3, 4], key
    assert metric_steps(mlflow_uri, out.mlflow_run_id, "test_accuracy") == [4]
    for row in out.history:  # the training steps alone: part of the epoch, which adds the validation pass
        assert 0 < row["train_seconds"] < row["seconds"], row
    # Epoch 3 was logged by the first attempt and trained again by the second: bit-identical numbers.
    logged = {m.step: m.value for m in MlflowClient(mlflow_uri).get_metric_history(out.mlflow_run_id, "train_loss")}
    assert logged[3] == out.history[2]["train_loss"] and logged[4] == out.history[3]["train_loss"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(out.metrics["ensemble"]["accuracy"])
    assert run.data.metrics["test_accuracy.wrn-10-2"] == pytest.approx(out.metrics["members"]["wrn-10-2"]["accuracy"])


def test_ray_job_submit_cli_end_to_end(ray_cluster, mlflow_uri, tmp_path):
    """The real `ray job submit --working-dir . -- python -m ray_jobs.train ...` on the loopback cluster:
    SUCCEEDED within a bounded time, and the run with its artifacts is in MLflow."""
    from mlflow import MlflowClient

    name = f"job-{int(time.time())}"
    entry = [sys.executable, "-m", "ray_jobs.train", "--set", "data.train_per_class=10", "--set", TWO_MEMBERS,
             "--set", "train.batch_size=50", "--set", "train.epochs=2", "--workers", "2", "--name", name,
             "--storage-path", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--tracking-uri", mlflow_uri]
    _, status, logs = submit_job(ray_cluster, entry)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "ensemble (mean)" in logs and "MLflow run:" in logs
    # no Ray error lines: Ray Train's preemption watcher ("E ... core_worker ... PreemptionWatcher") and its
    # placement-group cleaner ("Found multiple active Ray instances") used to print into every submitted job
    assert "PreemptionWatcher" not in logs and "Found multiple active Ray instances" not in logs, logs[-3000:]
    assert not re.search(r"^.*\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\]", logs, re.M) and "Traceback" not in logs

    mlflow = MlflowClient(mlflow_uri)
    exp = mlflow.get_experiment_by_name("superweights")
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`superweights.run_name` = '{name}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert metric_steps(mlflow_uri, run.info.run_id, "train_loss") == [1, 2]
    assert "test_accuracy" in run.data.metrics and run.data.tags["method"] == "superweights"
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/weights.safetensors", "checkpoint/plan.json", "checkpoint/config.json",
            "checkpoint/metrics.json"} <= artifacts
    assert (tmp_path / "out" / "weights.safetensors").is_file()


def test_a_run_started_in_process_resumes_on_two_workers_with_a_relative_data_root(ray_connected, mlflow_uri,
                                                                                   tmp_path, monkeypatch):
    """The default data.root ("data") is relative: the run's config must record it the same way whatever the
    worker count, or a resume on workers of a run started with --workers 0 would be refused as another config."""
    monkeypatch.chdir(tmp_path)
    overrides = [TWO_MEMBERS, "data.train_per_class=10", "train.batch_size=50"]
    storage = str(tmp_path / "ray")
    first = train(load_config(None, [*overrides, "train.epochs=1"]), RayOptions(workers=0, storage_path=storage),
                  name="mixed", tracking_uri=mlflow_uri, log=lambda s: None)
    lines: list[str] = []
    second = train(load_config(None, [*overrides, "train.epochs=2"]), RayOptions(workers=2, storage_path=storage),
                   name="mixed", tracking_uri=mlflow_uri, log=lines.append)
    assert second.resumed and second.workers == 2 and second.mlflow_run_id == first.mlflow_run_id
    assert [row["epoch"] for row in second.history] == [1, 2]
    assert metric_steps(mlflow_uri, second.mlflow_run_id, "train_loss") == [1, 2]

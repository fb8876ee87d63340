"""`superweights compare` on the session's Ray cluster: children as Ray tasks, concurrency, failures, ^C, Ray Jobs.

Tiny children (digits, 10 images per class, wrn-10-1 + wrn-10-2, 1 epoch: a few seconds each); the
in-process tests drive the session cluster through `ray_connected`, the job test submits to it.
"""

from __future__ import annotations

import sys
import time

import pytest

from core.errors import SuperweightsError
from ray_jobs.compare import KIND_TAG, SETTINGS_TAG, ChildResources, compare, format_markdown, train_child

from .conftest import REPO, TWO_MEMBERS, submit_job, write_image_folder

CONFIG = str(REPO / "configs/digits.toml")
TINY = ["data.train_per_class=10", TWO_MEMBERS, "train.epochs=1"]
FOUR = dict(budgets=[0.2], seeds=1, methods=["superweights", "full", "members"])  # 4 children


def runs_of(uri: str, experiment: str) -> dict[str, object]:
    """run name -> run (the parent is "compare")."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def launch(uri, experiment, out, *, lines=None, **kwargs):
    lines = [] if lines is None else lines
    kw = {**FOUR, **kwargs}
    budgets, seeds, methods = kw.pop("budgets"), kw.pop("seeds"), kw.pop("methods")
    report = compare(CONFIG, TINY, budgets, seeds, methods, experiment, uri, out, log=lines.append, **kw)
    return report, lines


@pytest.mark.slow
def test_two_children_at_once_give_the_same_table_as_one_at_a_time(ray_connected, mlflow_uri, tmp_path):
    """Each child has one CPU and one torch thread whatever runs beside it: the same numbers, to the bit."""
    serial, serial_lines = launch(mlflow_uri, "concurrency-1", tmp_path / "one",
                                  resources=ChildResources(max_concurrent=1))
    parallel, parallel_lines = launch(mlflow_uri, "concurrency-2", tmp_path / "two",
                                      resources=ChildResources(max_concurrent=2))
    assert [r["method"] for r in serial["rows"]] == ["superweights", "full", "member wrn-10-1", "member wrn-10-2"]
    assert parallel["rows"] == serial["rows"] and format_markdown(parallel) == format_markdown(serial)
    assert parallel["curves"] == serial["curves"]
    for lines in (serial_lines, parallel_lines):
        assert sum(": done, test accuracy" in s for s in lines) == 4 and not any("reused" in s for s in lines)
    assert "up to 1 at once" in serial_lines[0] and "up to 2 at once" in parallel_lines[0]
    one, two = runs_of(mlflow_uri, "concurrency-1"), runs_of(mlflow_uri, "concurrency-2")
    for runs in (one, two):
        parent = runs.pop("compare")
        assert parent.info.status == "FINISHED"
        assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs.values())
        assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    for name, run in one.items():  # full precision, not only the table's 4 decimals
        other = two[name]
        assert run.data.tags[SETTINGS_TAG] == other.data.tags[SETTINGS_TAG]
        for key in ("test_accuracy", "test_nll", "test_ece", "test_auc", "train_loss", "val_nll"):
            assert run.data.metrics[key] == other.data.metrics[key], (name, key)


def flaky_child(payload: dict) -> dict:
    """The task of the failure tests: `member wrn-10-1` fails, the `full` ensemble hangs until cancelled."""
    config = payload["config"]
    if config["ensemble"]["members"] == ["wrn-10-1"]:
        raise SuperweightsError("injected failure")
    if config["bank"]["method"] == "full" and len(config["ensemble"]["members"]) == 2:
        time.sleep(600)
    return train_child(payload)


@pytest.fixture
def by_value():
    """Ship this module's functions to the Ray workers by value (workers need not import the tests)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_a_failed_child_fails_the_launch_in_one_line_and_the_rerun_resumes(ray_connected, mlflow_uri, tmp_path,
                                                                            by_value):
    """Two at once: superweights finishes, `full` hangs, then `member wrn-10-1` fails. Its run ends FAILED,
    the in-flight `full` is cancelled (KILLED), wrn-10-2 never starts, the parent ends FAILED, and the error
    is one line. The rerun reuses the finished child and trains the other three."""
    experiment = "compare-failure"
    began = time.monotonic()
    with pytest.raises(SuperweightsError) as failed:
        launch(mlflow_uri, experiment, tmp_path / "first", lines=(first := []),
               resources=ChildResources(max_concurrent=2), task=flaky_child)
    assert time.monotonic() - began < 120  # the hanging child was cancelled, not waited for
    assert str(failed.value) == ("child [3/4] member wrn-10-1 seed 0 failed: injected failure (finished children "
                                 "are kept: rerun the same command to resume)")
    assert [s for s in first if ": done" in s] and all("[1/4] superweights" in s for s in first if ": done" in s)
    runs = runs_of(mlflow_uri, experiment)
    assert {name: r.info.status for name, r in runs.items()} == {
        "compare": "FAILED", "superweights b=0.2 s=0": "FINISHED", "full b=None s=0": "KILLED",
        "member wrn-10-1 b=None s=0": "FAILED"}

    report, again = launch(mlflow_uri, experiment, tmp_path / "again", resources=ChildResources(max_concurrent=2))
    assert [s for s in again if "reused a finished run" in s] == ["[1/4] superweights budget 0.2 seed 0: reused a finished run"]
    assert sum(": done" in s for s in again) == 3 and "training 3 of 4 children" in again[1]
    assert len(report["rows"]) == 4
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = {r.info.status: r.info.run_id for r in runs if r.data.tags[KIND_TAG] == "compare-parent"}
    assert sorted(parents) == ["FAILED", "FINISHED"]
    children = sorted((r.info.run_name, r.info.status) for r in runs
                      if r.data.tags.get("mlflow.parentRunId") == parents["FINISHED"])
    assert children == [("full b=None s=0", "FINISHED"), ("member wrn-10-1 b=None s=0", "FINISHED"),
                        ("member wrn-10-2 b=None s=0", "FINISHED")]


@pytest.mark.slow
def test_interrupt_ends_in_flight_children_and_the_parent_killed(ray_connected, mlflow_uri, tmp_path, by_value):
    """^C in the driver (here: raised by the progress callback after the first child finished)."""
    experiment = "compare-interrupt"

    def log(line):
        if ": done" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compare(CONFIG, TINY, [0.2], 1, ["superweights", "full"], experiment, mlflow_uri, tmp_path, log=log,
                resources=ChildResources(max_concurrent=2), task=flaky_child)
    runs = runs_of(mlflow_uri, experiment)
    assert {name: r.info.status for name, r in runs.items()} == {
        "compare": "KILLED", "superweights b=0.2 s=0": "FINISHED", "full b=None s=0": "KILLED"}


@pytest.mark.slow
def test_more_child_cpus_than_any_node_has_is_refused_before_anything_starts(ray_connected, mlflow_uri, tmp_path):
    with pytest.raises(SuperweightsError, match=r"^--child-cpus 3 is more than any node of the Ray cluster has "
                                                r"\(largest: 2 CPUs\); use --child-cpus <= 2$"):
        launch(mlflow_uri, "compare-too-many-cpus", tmp_path, resources=ChildResources(cpus=3))
    from mlflow import MlflowClient

    assert MlflowClient(mlflow_uri).get_experiment_by_name("compare-too-many-cpus") is None  # not even a parent


@pytest.mark.parametrize("args, message", [
    (["--child-cpus", "0"], "--child-cpus must be >= 1, got 0"),
    (["--child-cpus", "-2"], "--child-cpus must be >= 1, got -2"),
    (["--child-gpus", "-1"], "--child-gpus must be >= 0, got -1"),
    (["--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
    (["--device", "cuda"], "--device cuda needs a GPU per child: add --child-gpus 1"),
    (["--device", "tpu"], "--device must be cpu or cuda, got 'tpu': use cpu, cuda or cuda:N (N = a GPU index >= 0)"),
])
def test_bad_child_resources_are_one_line_errors(tmp_path, capsys, args, message):
    from ray_jobs.cli import main

    assert main(["compare", *args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"superweights: error: {message}\n"
    assert not (tmp_path / "m.db").exists()  # refused before MLflow or Ray


@pytest.mark.slow
def test_ray_job_submit_compare_end_to_end(ray_cluster, mlflow_uri, tmp_path):
    """`ray job submit --working-dir . -- python -m ray_jobs.cli compare ...` with one child on the loopback
    cluster: SUCCEEDED, the child FINISHED under its parent, and no Ray noise in the job's logs."""
    from mlflow import MlflowClient

    experiment = f"compare-job-{int(time.time())}"
    entry = [sys.executable, "-m", "ray_jobs.cli", "compare", "--config", "configs/digits.toml",
             *[a for s in TINY for a in ("--set", s)], "--methods", "full", "--seeds", "1",
             "--experiment", experiment, "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "report")]
    _, status, logs = submit_job(ray_cluster, entry)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "[1/1] full seed 0: done, test accuracy" in logs and "| full |" in logs
    assert "PreemptionWatcher" not in logs and "Found multiple active Ray instances" not in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    assert (tmp_path / "report" / "comparison.csv").is_file()

    runs = runs_of(mlflow_uri, experiment)
    parent, child = runs.pop("compare"), runs.pop("full b=None s=0")
    assert not runs
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "test_accuracy" in child.data.metrics
    artifacts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(child.info.run_id, "anytime")}
    assert {"anytime/anytime.csv", "anytime/summary.json", "anytime/anytime.png"} <= artifacts



@pytest.mark.slow
def test_method_steps_run_in_compare_children(ray_connected, mlflow_uri, tmp_path):
    """The compare children run the same loop as `train`: learned SSN groups (pre-training + k-means) and,
    for the superweights child, gradient regrouping and unsharing; their plans reach MLflow."""
    import json

    from mlflow import MlflowClient

    overrides = [*TINY, "train.epochs=2", "bank.ssn_groups=learned", "bank.pretrain_steps=3", "bank.groups=2",
                 "bank.grouping=gradient", "grouping.warmup_epochs=1", "grouping.batches=1", "bank.unshare_epoch=1",
                 "bank.unshare_batches=1", "bank.unshare_threshold=1.01"]  # 1.01: every shared pair splits
    report = compare(CONFIG, overrides, [0.1], 1, ["superweights", "ssn-repeat", "full"], "method-steps", mlflow_uri,
                     tmp_path / "report", log=lambda s: None, resources=ChildResources(max_concurrent=2))
    sw_label, ssn_label = "superweights, gradient grouping + unsharing at epoch 1", "ssn-repeat, learned groups"
    assert [r["method"] for r in report["rows"]] == [sw_label, ssn_label, "full"]
    runs = runs_of(mlflow_uri, "method-steps")
    client = MlflowClient(mlflow_uri)

    def plan_of(run):
        path = client.download_artifacts(run.info.run_id, "checkpoint/plan.json", str(tmp_path / run.info.run_id))
        return json.loads(open(path).read())["bank"]

    ssn = plan_of(runs[f"{ssn_label} b=0.1 s=0"])
    assert len(ssn["groups"]) == 2  # k-means groups, not the 4 depth bins
    sw_run = runs[f"{sw_label} b=0.1 s=0"]
    sw = plan_of(sw_run)
    assert len({s["group"] for s in sw["slots"]}) == sw_run.data.metrics["groups"] > 8  # learned, not depth
    assert sw_run.data.metrics["unshared_pairs"] > 0
    assert len({s["coef"] for s in sw["slots"]}) == sw_run.data.metrics["coefficient_sets"]
    assert runs["full b=None s=0"].info.status == "FINISHED"


@pytest.mark.slow
def test_a_relative_data_root_means_the_users_folder_in_compare_children(ray_connected, mlflow_uri, tmp_path,
                                                                          monkeypatch):
    """Compare children run as Ray tasks in a folder of Ray's: `data.root = "imgs"` must still be ./imgs."""
    write_image_folder(tmp_path / "imgs", {"train": 12, "val": 3})
    monkeypatch.chdir(tmp_path)
    overrides = [*TINY, 'data.name="imagefolder"', 'data.root="imgs"', 'data.cache_dir="cache"',
                 "data.train_per_class=0", "train.batch_size=8"]
    report = compare(CONFIG, overrides, [1.0], 1, ["full"], "relative-root", mlflow_uri, tmp_path / "report",
                     log=lambda s: None)
    assert [r["method"] for r in report["rows"]] == ["full"]
    assert {r.info.run_name: r.info.status for r in runs_of(mlflow_uri, "relative-root").values()} == {
        "full b=None s=0": "FINISHED", "compare": "FINISHED"}

"""Ray training without a cluster: layout, fail-fast input errors, the in-process (0 workers) path."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from core.errors import SuperweightsError
from ensemble.checkpoint import load_checkpoint
from ensemble.config import load_config
from ensemble.data import dataset_info
from ensemble.loop import fit
from ensemble.methods import plan_summary
from ray_jobs import cli
from ray_jobs.driver import RayOptions, train
from ray_jobs.parallel import available_cpus, partition_members, resolve_layout

from .conftest import REPO, TWO_MEMBERS, closed_port, metric_steps, mlflow_run

TINY = ["data.train_per_class=10", TWO_MEMBERS, "train.batch_size=50", "train.epochs=2"]


def test_members_are_balanced_by_flops():
    assert partition_members([10, 1, 1, 8], 2) == ((0,), (1, 2, 3))
    assert partition_members([5, 5, 5, 5], 2) == ((0, 2), (1, 3))
    assert partition_members([3, 1], 1) == ((0, 1),)
    config = load_config(None, ['ensemble.members=["wrn-16-4","wrn-16-2","wrn-10-4","wrn-10-2"]'])
    flops = [m["flops"] for m in plan_summary(config, dataset_info(config.data))["members"]]
    groups = partition_members(flops, 2)
    loads = [sum(flops[i] for i in g) for g in groups]
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    assert abs(loads[0] - loads[1]) <= max(flops)


def test_layout_defaults_and_errors():
    four = [4, 3, 2, 1]
    assert resolve_layout(2, 0, 0, four, 64).to_dict() == {"member_groups": 2, "data_replicas": 1, "groups": [[0, 3], [1, 2]]}
    one = resolve_layout(2, 0, 0, [7], 64)
    assert (one.member_groups, one.data_replicas) == (1, 2)
    both = resolve_layout(4, 2, 0, four, 64)
    assert (both.member_groups, both.data_replicas, both.world) == (2, 2, 4)
    assert [both.owner_of(i) for i in range(4)] == [0, 2, 2, 0]
    assert resolve_layout(0, 0, 0, four, 64).world == 1  # in-process
    with pytest.raises(SuperweightsError, match="must equal the 2 workers"):
        resolve_layout(2, 2, 2, four, 64)
    with pytest.raises(SuperweightsError, match="cannot split 2 members over 3 member groups"):
        resolve_layout(3, 3, 0, [1, 2], 64)
    with pytest.raises(SuperweightsError, match="not divisible by the 2 data replicas"):
        resolve_layout(2, 1, 2, four, 63)


def _cli_error(capsys, argv: list[str], limit_s: float = 15.0) -> str:
    import ray

    was_up = ray.is_initialized()
    start = time.monotonic()
    code = cli.main(argv)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("superweights: error: ") and "\n" not in err, err
    assert elapsed < limit_s, f"took {elapsed:.1f}s: {err}"
    assert ray.is_initialized() == was_up  # nothing was started
    return err


def test_more_workers_than_cpus_is_refused_before_anything_starts(capsys, tmp_path):
    n = available_cpus() + 1
    err = _cli_error(capsys, ["train", "--workers", str(n), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                              "--storage-path", str(tmp_path / "runs"), "--set", TWO_MEMBERS])
    assert f"{n} workers need {n} CPUs" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_unreachable_tracking_server_fails_fast(capsys, tmp_path):
    port = closed_port()
    err = _cli_error(capsys, ["train", "--tracking-uri", f"http://127.0.0.1:{port}", "--workers", "0",
                              "--storage-path", str(tmp_path)])
    assert f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in err


def test_unreachable_ray_address_fails_fast(capsys, tmp_path):
    port = closed_port()
    err = _cli_error(capsys, ["train", "--address", f"127.0.0.1:{port}", "--tracking-uri",
                              f"sqlite:///{tmp_path}/m.db", "--storage-path", str(tmp_path)])
    assert f"Ray cluster at 127.0.0.1:{port} is not reachable" in err


@pytest.mark.parametrize(("argv", "match"), [
    (["--tracking-uri", "mlruns"], "file store"),
    (["--tracking-uri", "sqlite:///relative.db"], "absolute SQLite path"),
    (["--address", "http://127.0.0.1:8265"], "dashboard (job submission) URL"),
    (["--workers", "2", "--member-groups", "3"], "cannot split 2 members over 3 member groups"),
    (["--workers", "2", "--member-groups", "2", "--data-replicas", "2"], "must equal the 2 workers"),
    (["--checkpoint-every", "0"], "ray.checkpoint_every must be >= 1"),
    (["--cpus-per-worker", "-1"], "ray.cpus_per_worker must be >= 0"),
    # URIs are storage (s3://, gs://, file://): one that pyarrow cannot open is refused before anything starts
    (["--storage-path", "nosuch://bucket/runs"], "--storage-path 'nosuch://bucket/runs' is not a storage URI"),
    (["--out", "s3:/bucket/model"], "--out 's3:/bucket/model' is not a storage URI"),
    # keys of the SuperWeight method's learning steps: honoured by the loop or refused, never ignored
    (["--set", "bank.method=full", "--set", "bank.grouping=gradient"], "bank.grouping='gradient' is a SuperWeights step"),
    (["--set", "bank.method=ssn", "--set", "bank.unshare_epoch=1"], "bank.unshare_epoch=1 is a SuperWeights step"),
    (["--set", "train.epochs=3", "--set", "bank.unshare_epoch=4"], "bank.unshare_epoch must be between 0 (never) and"),
    (["--set", "bank.share_coefficients=false", "--set", "bank.unshare_epoch=1"], "nothing to unshare"),
    (["--set", "grouping.batches=0"], "grouping.batches must be >= 1"),
])
def test_bad_train_options_are_one_line_errors(capsys, tmp_path, argv, match):
    base = ["train", "--set", TWO_MEMBERS, "--storage-path", str(tmp_path)]
    if "--tracking-uri" not in argv:
        base += ["--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    if "--workers" in argv and available_cpus() < 2:
        pytest.skip("needs 2 CPUs")
    assert match in _cli_error(capsys, base + argv)


def test_job_entrypoint_reports_one_line_and_exit_2(tmp_path):
    """`python -m ray_jobs.train` is the `ray job submit` entrypoint: same error contract as the CLI."""
    port = closed_port()
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--address", f"127.0.0.1:{port}",
                           "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"superweights: error: Ray cluster at 127.0.0.1:{port} is not reachable (Connection refused); start one "
        "with `ray start --head` or leave --address empty to run a local Ray"]


@pytest.mark.slow
def test_in_process_run_is_the_same_loop_tracks_and_resumes(tmp_path, mlflow_uri):
    """--workers 0: the Ray Train loop runs in this process (Ray Train V2 local mode), equals `fit` exactly,
    logs to MLflow, writes a loadable checkpoint; rerunning the finished run resumes it without new epochs."""
    config = load_config(None, TINY)
    options = RayOptions(workers=0, storage_path=str(tmp_path / "runs"))
    lines: list[str] = []
    out = train(config, options, name="local", out=tmp_path / "out", tracking_uri=mlflow_uri, log=lines.append)
    assert [h["epoch"] for h in out.history] == [1, 2]
    assert out.layout.world == 1 and out.workers == 0
    assert any(line.startswith("parallelism: in this process") for line in lines)

    ref = fit(config, None, progress=False, log=lambda s: None)
    weights = load_file(str(out.checkpoint / "weights.safetensors"))
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert out.metrics["ensemble"]["accuracy"] == pytest.approx(ref.metrics["ensemble"]["accuracy"])

    _, _, model, metrics = load_checkpoint(out.out_dir)
    assert metrics["split"] == "test" and list(model.names) == ["wrn-10-1", "wrn-10-2"]
    assert (out.out_dir / "anytime.json").is_file()

    run = mlflow_run(mlflow_uri, out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "superweights" and run.data.tags["members"] == "wrn-10-1,wrn-10-2"
    assert float(run.data.tags["budget_ratio"]) == pytest.approx(0.5, abs=0.01)
    assert run.data.params["train.epochs"] == "2" and int(run.data.params["plan.bank_params"]) > 0
    assert int(run.data.params["plan.flops.wrn-10-2"]) > int(run.data.params["plan.flops.wrn-10-1"])
    assert metric_steps(mlflow_uri, out.mlflow_run_id, "train_loss") == [1, 2]
    assert run.data.metrics["test_accuracy"] == pytest.approx(out.metrics["ensemble"]["accuracy"])

    again = train(config, options, name="local", out=tmp_path / "out2", tracking_uri=mlflow_uri, log=lines.append)
    assert again.resumed and again.mlflow_run_id == out.mlflow_run_id
    assert again.extra["resumes"] == [] and [h["epoch"] for h in again.history] == [1, 2]
    assert metric_steps(mlflow_uri, out.mlflow_run_id, "train_loss") == [1, 2]
    assert metric_steps(mlflow_uri, out.mlflow_run_id, "test_accuracy") == [2]
    assert mlflow_run(mlflow_uri, out.mlflow_run_id).info.status == "FINISHED"

    changed = load_config(None, [*TINY, "train.lr=0.1"])
    with pytest.raises(SuperweightsError, match="was trained with train.lr=0.05"):
        train(changed, options, name="local", tracking_uri=mlflow_uri, log=lines.append)
    json.loads((tmp_path / "runs" / "local" / "superweights_run.json").read_text())


@pytest.mark.slow
def test_in_process_failure_ends_failed_and_a_rerun_resumes_it(tmp_path, mlflow_uri):
    """0 workers has no automatic retry: the crash propagates and the MLflow run ends FAILED (never left
    RUNNING). Rerunning with the same name resumes from the last checkpoint and finishes the same run."""
    from ray_jobs.worker import InjectedCrash

    config = load_config(None, [*TINY[:-1], "train.epochs=3"])
    options = RayOptions(workers=0, storage_path=str(tmp_path / "runs"), crash_at_epoch=3, checkpoint_every=1)
    with pytest.raises(InjectedCrash):
        train(config, options, name="fails", tracking_uri=mlflow_uri, log=lambda s: None)
    record = json.loads((tmp_path / "runs" / "fails" / "superweights_run.json").read_text())
    assert mlflow_run(mlflow_uri, record["mlflow_run_id"]).info.status == "FAILED"
    assert metric_steps(mlflow_uri, record["mlflow_run_id"], "train_loss") == [1, 2]

    out = train(config, options, name="fails", tracking_uri=mlflow_uri, log=lambda s: None)
    assert out.mlflow_run_id == record["mlflow_run_id"] and out.extra["resumes"] == [2]
    assert [h["epoch"] for h in out.history] == [1, 2, 3]
    assert mlflow_run(mlflow_uri, out.mlflow_run_id).info.status == "FINISHED"
    assert metric_steps(mlflow_uri, out.mlflow_run_id, "train_loss") == [1, 2, 3]
    ref = fit(config, None, progress=False, log=lambda s: None)
    weights = load_file(str(out.checkpoint / "weights.safetensors"))
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_options_come_from_the_config_section_then_the_flags():
    """`[ray]`/`[debug]` config sections, same field names as the flags; a flag given on the command line wins."""
    import argparse

    from ray_jobs.train import add_train_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = load_config(None, ["ray.workers=4", "ray.checkpoint_every=3", "ray.storage_path=/x",
                                "debug.crash_at_epoch=2"])
    opts = options_from_args(parser.parse_args(["--workers", "1"]), config)
    assert (opts.workers, opts.checkpoint_every, opts.storage_path, opts.crash_at_epoch) == (1, 3, "/x", 2)
    assert options_from_args(parser.parse_args([]), load_config(None)) == RayOptions()

"""A diverged run through `superweights train` on real Ray workers: one line, exit 2, MLflow FAILED with the
reason as a tag, no model files, and no restart of the worker group (it would only diverge again)."""

import pytest
from mlflow import MlflowClient

from ray_jobs import cli

from .conftest import TWO_MEMBERS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("workers", ["2", "0"])
def test_a_diverged_run_fails_in_one_line_with_its_reason_in_mlflow(ray_connected, mlflow_uri, tmp_path, capsys,
                                                                    workers):
    name = f"diverged-{workers}"
    code = cli.main(["train", "--quiet", "--set", TWO_MEMBERS, "--set", "data.train_per_class=10", "--set",
                     "train.batch_size=50", "--set", "train.epochs=3", "--set", "train.lr=1e6", "--workers", workers,
                     "--name", name, "--storage-path", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                     "--tracking-uri", mlflow_uri])
    captured = capsys.readouterr()
    # (the session cluster's test driver joins with its own ray.init, whose Ray Train controller may print
    # its own lines to stderr; the product's line is the one starting "superweights:")
    ours = [line for line in captured.err.splitlines() if line.startswith("superweights:")]
    assert code == 2 and len(ours) == 1, captured.err
    err = ours[0]
    assert err.startswith("superweights: error: training diverged at epoch "), err
    assert "lower train.lr (now 1e+06)" in err
    assert "resumed from" not in captured.out  # Ray Train did not restart the workers from a checkpoint
    assert not (tmp_path / "out").exists()
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("superweights")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`superweights.run_name` = '{name}'")
    assert run.info.status == "FAILED"
    assert run.data.tags["superweights.failure"] == err.removeprefix("superweights: error: ")

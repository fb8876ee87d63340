"""`superweights train` with the GPU-readiness keys (train.precision / channels_last / compile)."""

import pytest

import ensemble.training as training
from ray_jobs import cli

from .conftest import TWO_MEMBERS, mlflow_run, set_args, train_refusal

TINY = [TWO_MEMBERS, "train.epochs=1", "data.train_per_class=10"]


def test_an_unknown_precision_is_one_line_exit_2(tmp_path, capsys):
    assert train_refusal(capsys, tmp_path, *TINY, "train.precision=fp16") == \
        "superweights: error: train.precision must be fp32 or bf16, got 'fp16'"


@pytest.mark.slow
def test_bf16_channels_last_compile_train_through_the_cli(tmp_path, capfd, monkeypatch):
    """--workers 0 runs the loop in this process: the "eager" Dynamo backend keeps compiling to seconds."""
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    code = cli.main(["train", "--workers", "0", "--no-tracking", "--storage-path", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "out"),
                     *set_args(*TINY, "train.precision=bf16", "train.channels_last=true", "train.compile=true")])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "warning: train.compile" not in captured.err
    assert (tmp_path / "out" / "weights.safetensors").is_file()


@pytest.mark.parametrize("overrides, said", [
    (["train.channels_last=false"], "memory format: row-major (train.channels_last = false)"),
    (['ensemble.members=["mlp-32-1","mlp-16-2"]'], "memory format: row-major (no convolutions)"),  # default: on
])
def test_row_major_when_asked_or_without_convs_is_said_and_saved(tmp_path, capsys, overrides, said):
    code = cli.main(["train", "--workers", "0", "--no-tracking", "--storage-path", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "out"), *set_args(*TINY, *overrides)])
    assert code == 0 and said in capsys.readouterr().out
    from safetensors.torch import load_file

    assert int(load_file(str(tmp_path / "out" / "weights.safetensors"))["bank.channels_last"]) == 0
    assert cli.main(["plan", "--from", str(tmp_path / "out")]) == 0
    assert "bank weights: row-major" in capsys.readouterr().out


@pytest.mark.slow
def test_channels_last_superweights_through_default_workers_and_evaluate(ray_connected, mlflow_uri, tmp_path, capsys):
    """`superweights train` as a user calls it (train.channels_last unset: on, on a CPU too) on its default 2 Ray
    workers (member-parallel): the bank is made for channels_last convolutions (saved as bank.channels_last = 1),
    the workers' weights are the in-process loop's, and `superweights evaluate` reads the checkpoint back to the
    metrics training reported."""
    import json

    from safetensors.torch import load_file

    from ensemble.config import load_config
    from ensemble.loop import fit

    from .test_train_ray import assert_same_weights

    overrides = list(TINY)
    out = tmp_path / "out"
    code = cli.main(["train", "--quiet", "--name", "cl", "--storage-path", str(tmp_path / "runs"), "--out", str(out),
                     "--tracking-uri", mlflow_uri, *set_args(*overrides)])
    printed = capsys.readouterr().out
    assert code == 0 and "2 Ray workers = 2 member group(s)" in printed
    assert "memory format: channels_last (conv members, batches and the bank's generated conv weights)" in printed
    assert int(load_file(str(out / "weights.safetensors"))["bank.channels_last"]) == 1
    run_id = json.loads((tmp_path / "runs" / "cl" / "superweights_run.json").read_text())["mlflow_run_id"]
    assert mlflow_run(mlflow_uri, run_id).data.tags["channels_last"] == "true"
    assert cli.main(["plan", "--from", str(out)]) == 0
    assert "bank weights: channels_last (cells read as [O, kh, kw, I])" in capsys.readouterr().out
    ref = fit(load_config(None, overrides), None, progress=False, log=lambda s: None)
    assert int(ref.model.bank.channels_last) == 1
    assert_same_weights(out, ref.model)
    assert cli.main(["evaluate", str(out), "--out", str(tmp_path / "eval"), "--tracking-uri", mlflow_uri]) == 0
    trained = json.loads((out / "metrics.json").read_text())["ensemble"]
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())["plain"]  # (the plain mean's)
    assert evaluated["final_accuracy"] == trained["accuracy"]
    assert evaluated["nll"] == pytest.approx(trained["nll"], rel=1e-6)

"""`superweights train` with the GPU-readiness keys (train.precision / channels_last / compile)."""

import pytest

import ensemble.training as training
from ray_jobs import cli

from .conftest import TWO_MEMBERS, set_args, train_refusal

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

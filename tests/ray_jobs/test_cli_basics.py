"""The `superweights` CLI as a user runs it: a subprocess, real files, exit codes and stderr."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_plan_json_has_stable_fields():
    p = run("plan", "--config", "configs/digits.toml", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["bank_params"] == s["budget"]
    assert [m["name"] for m in s["members"]] == ["wrn-16-4", "wrn-16-2", "wrn-10-4", "wrn-10-2"]
    assert s["total_params"] == s["bank_params"] + s["coefficient_params"] + s["private_params"]


def test_cifar100_plan_needs_no_files(tmp_path):
    p = run("plan", "--set", "data.name=cifar100", "--set", f"data.root={tmp_path}",
            "--set", 'ensemble.members=["wrn-28-10"]', "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["members"][0]["params"] == 36_479_194 + 90 * 641


def test_plan_table_is_readable():
    p = run("plan", "--set", "bank.budget=12345")
    assert p.returncode == 0
    assert "bank_params" in p.stdout and "12,345" in p.stdout and "full_ensemble_params" in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", 'ensemble.members=["wrn-16-3x"]'], "unknown member 'wrn-16-3x'; valid names: "),
        (["--set", 'ensemble.members=["wrn-12-2"]'], "invalid WideResNet depth 12: valid depths are 6n+4"),
        (["--set", "bank.budget=3"], "bank.budget=3 is too small: the minimum is"),
        (["--set", "bank.foo=3"], "unknown config key bank.foo; valid keys:"),
        (["--set", "bank.budget"], "malformed --set 'bank.budget'"),
        (["--config", "nowhere.toml"], "config file 'nowhere.toml' does not exist"),
        (["--set", "train.lr=-0.1"], "train.lr must be > 0, got -0.1"),
        # 12 TB of bank, gradients and momentum: no machine here has it (issue 13: `plan` used to accept it)
        (["--set", "bank.budget=1000000000000"], "a bank of 1,000,000,000,000 parameters (bank.budget) needs at least "
                                                 "12,00"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    p = run("plan", *args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("superweights: error: ") and message in lines[0], p.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-0.1", "train.lr must be > 0, got -0.1"),
        ("bank.budget=1000000000000", "GB available: lower bank.budget"),
    ],
)
def test_train_refuses_bad_values_in_one_line_before_any_worker(tmp_path, override, message):
    p = run("train", "--set", override, "--workers", "0", "--storage-path", str(tmp_path / "ray"),
            "--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "resume" not in lines[0], p.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "ray").exists()


def test_a_first_run_on_a_new_mlflow_store_prints_no_store_setup_lines(tmp_path):
    """MLflow's "Creating initial MLflow database tables..." / "Updating database tables" INFO lines used to
    appear in the middle of every user's first `make run`; the run still lands in the new store."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    p = run("train", "--workers", "0", "--set", 'ensemble.members=["wrn-10-1"]', "--set", "train.epochs=1",
            "--set", "data.train_per_class=5", "--storage-path", str(tmp_path / "runs"), "--out",
            str(tmp_path / "out"), "--tracking-uri", uri)
    assert p.returncode == 0, p.stderr[-3000:]
    output = p.stdout + p.stderr
    assert "database tables" not in output and " INFO mlflow" not in output, output[-3000:]
    (run_,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("superweights").experiment_id])
    assert run_.info.status == "FINISHED"


def test_missing_cifar_files_say_where_they_go(tmp_path):
    p = run("train", "--set", "data.name=cifar10", "--set", f"data.root={tmp_path}", "--workers", "0")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"CIFAR-10 files not found in {tmp_path}/cifar-10-batches-py" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_help_explains_commands():
    p = run("--help")
    assert p.returncode == 0 and "plan" in p.stdout and "train" in p.stdout and "--set" in run("plan", "--help").stdout


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:12"])
def test_valid_device_names(name):
    from ensemble.training import validate_device

    assert validate_device(name) == name


@pytest.mark.parametrize("name", ["tpu", "mps", "CUDA", "Cpu", "cuda:", "cuda:x", "cuda:-1", "cuda:1.0", "cuda:0 ",
                                  " cpu", "cuda0", "cuda:0:1", "", None])
def test_invalid_device_names_are_one_line_errors(name):
    from core.errors import SuperweightsError
    from ensemble.training import validate_device

    with pytest.raises(SuperweightsError) as e:
        validate_device(name)
    assert str(e.value).startswith(f"--device must be cpu or cuda, got {name!r}: use cpu, cuda or cuda:N")
    assert "\n" not in str(e.value)


def test_train_device_tpu_is_one_line_exit_2_before_anything_starts(tmp_path):
    """It used to train on CPU silently (workers only look for "cuda"): now refused before config, Ray or MLflow."""
    p = run("train", "--device", "tpu", "--workers", "2", "--out", str(tmp_path / "out"),
            "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines == ["superweights: error: --device must be cpu or cuda, got 'tpu': use cpu, cuda or cuda:N "
                     "(N = a GPU index >= 0)"], p.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store, no output


@pytest.mark.parametrize("command", [
    ["train", "--workers", "0"],
    ["evaluate", "{tmp}/nowhere"],
    ["serve", "{tmp}/nowhere", "--port", "0"],
    ["compare", "--out", "{tmp}/report", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"],
])
@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_every_device_option_takes_only_cpu_cuda_or_cuda_n(command, device, tmp_path, capsys):
    """In-process `main` (as the subprocess above): the device is checked first, before a checkpoint is read,
    a port opened, Ray started or an MLflow store created."""
    from ray_jobs.cli import main

    code = main([*(a.format(tmp=tmp_path) for a in command), "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"superweights: error: --device must be cpu or cuda, got {device!r}: use cpu, "
                                 "cuda or cuda:N (N = a GPU index >= 0)"], err
    assert list(tmp_path.iterdir()) == []

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
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    p = run("plan", *args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("superweights: error: ") and message in lines[0], p.stderr


def test_missing_cifar_files_say_where_they_go(tmp_path):
    p = run("train", "--set", "data.name=cifar10", "--set", f"data.root={tmp_path}", "--workers", "0")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"CIFAR-10 files not found in {tmp_path}/cifar-10-batches-py" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_help_explains_commands():
    p = run("--help")
    assert p.returncode == 0 and "plan" in p.stdout and "train" in p.stdout and "--set" in run("plan", "--help").stdout

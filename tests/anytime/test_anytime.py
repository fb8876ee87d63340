import json
import math
import shutil

import pytest
import torch

from anytime.evaluate import normalized_auc, point_metrics, run_evaluation
from anytime.predictor import AnytimePredictor
from anytime.record import FITTED, anytime_record
from anytime.schedule import explicit_schedule, greedy_schedule
from anytime.store import load_anytime
from core.errors import SuperweightsError
from core.flops import count_flops
from ensemble.checkpoint import save_checkpoint
from ensemble.exits import ExitMember
from ensemble.methods import build_ensemble, make_plan
from ensemble.planning import example_input, meta_members
from ensemble.training import exit_loss
from ray_jobs.cli import main

from .conftest import DIGITS, cfg


@pytest.fixture(scope="module")
def ckpt(exits_ckpt):
    return load_anytime(exits_ckpt[1])


def plain(record: dict) -> dict:
    """The record without its fitted parts: the predictor's combiner is then the plain mean of latest exits."""
    return {k: v for k, v in record.items() if k not in FITTED}


@pytest.fixture(scope="module")
def predictor(ckpt):
    """The plain-mean predictor (the fitted combiner is tested in test_early_exit.py)."""
    return AnytimePredictor(ckpt.model, plain(ckpt.record))


# -- exits in the model ---------------------------------------------------------------------------


def test_exit_linears_are_bank_slots():
    plain = make_plan(cfg(), DIGITS)
    exits = make_plan(cfg("ensemble.exits=all"), DIGITS)
    extra = [s for s in exits.slots if s.name.startswith("exits.")]
    assert len(exits.slots) == len(plain.slots) + 4 and len(extra) == 4  # 2 exits x 2 members
    assert all(s.kind == "linear" for s in extra)


def test_forward_exits_shapes_and_last_exit_is_forward(exits_ckpt):
    model = exits_ckpt[0].model.eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        ex = model.forward_exits(x)
        assert ex.shape == (3, 2, 3, 10)
        torch.testing.assert_close(ex[:, :, -1], model(x), atol=1e-6, rtol=0)


def test_exits_none_keeps_members_unchanged():
    model = build_ensemble(cfg(), DIGITS)
    assert not model.has_exits and model.num_exits == [1, 1]
    assert not any(isinstance(m, ExitMember) for m in model.members)


def test_exit_list_adds_classifier_and_unknown_stage_is_one_line_error():
    model = build_ensemble(cfg("ensemble.exits=[0]"), DIGITS)
    assert model.num_exits == [2, 2] and model.members[0].exit_stages == (0, 2)
    with pytest.raises(SuperweightsError, match=r"stage index 7 does not exist in wrn-10-2 \(stages 0..2\)") as e:
        build_ensemble(cfg("ensemble.exits=[0, 7]"), DIGITS)
    assert "\n" not in str(e.value)
    with pytest.raises(SuperweightsError, match="ensemble.exits"):
        cfg("ensemble.exits=some")


def test_exit_loss_sums_weighted_exits():
    logits, y = [torch.randn(4, 3, 10), torch.randn(4, 3, 10)], torch.randint(0, 10, (4,))
    ce = torch.nn.functional.cross_entropy
    expected = sum(w * ce(lg[:, e], y) for lg in logits for e, w in enumerate((0.5, 1.0, 2.0)))
    torch.testing.assert_close(exit_loss(logits, y, (0.5, 1.0, 2.0)), expected)
    torch.testing.assert_close(exit_loss(logits, y), sum(ce(lg[:, e], y) for lg in logits for e in range(3)))
    with pytest.raises(SuperweightsError, match="exit_weights"):
        exit_loss(logits, y, (1.0, 1.0))


# -- costs, schedules, predictor ------------------------------------------------------------------


def test_step_flops_sum_to_full_forward_with_all_exits(ckpt):
    metas = meta_members(ckpt.config, ckpt.info)
    for m, meta in enumerate(metas):
        assert sum(ckpt.record["step_flops"][m]) == count_flops(meta, example_input(ckpt.info))
    cum = ckpt.record["schedule"]["cumulative_flops"]
    assert all(b > a for a, b in zip(cum, cum[1:]))
    assert sorted(map(tuple, ckpt.steps)) == [(m, k) for m in range(2) for k in range(3)]


def test_predictor_after_all_steps_equals_full_forward(ckpt, predictor):
    x = torch.rand(9, 1, 8, 8)
    out = predictor.predict(x)
    with torch.no_grad():
        ref = ckpt.model(x).softmax(-1).mean(1)
    torch.testing.assert_close(out.probs, ref, atol=1e-5, rtol=0)
    assert out.steps == ckpt.steps and out.flops == ckpt.record["schedule"]["cumulative_flops"][-1]


def test_prefix_matches_latest_exits(ckpt, predictor):
    x = torch.rand(5, 1, 8, 8)
    cum = predictor.cumulative_flops
    out = predictor.predict(x, budget_flops=cum[2])
    assert len(out.steps) == 3
    with torch.no_grad():
        exits = ckpt.model.forward_exits(x).softmax(-1)  # (B, M, E, C)
    latest = {}
    for m, k in out.steps:
        latest[m] = exits[:, m, k]
    torch.testing.assert_close(out.probs, torch.stack(list(latest.values())).mean(0), atol=1e-5, rtol=0)


def test_flops_never_exceed_budget(predictor):
    x = torch.rand(2, 1, 8, 8)
    total = predictor.cumulative_flops[-1]
    spent = []
    for budget in torch.linspace(predictor.min_flops, total * 1.2, 25).tolist():
        out = predictor.predict(x, budget_flops=budget)
        assert out.flops <= budget
        assert out.steps == predictor.steps[: len(out.steps)]
        spent.append(out.flops)
    assert spent == sorted(spent) and spent[-1] == total


def test_budget_below_first_step_names_the_minimum(predictor):
    with pytest.raises(SuperweightsError, match=f"minimum budget is {predictor.min_flops:,}"):
        predictor.predict(torch.rand(1, 1, 8, 8), budget_flops=predictor.min_flops - 1)


def test_deadline(predictor):
    x = torch.rand(4, 1, 8, 8)
    tight = predictor.predict(x, deadline_ms=0.0)
    assert len(tight.steps) == 1 and tight.deadline_met is False  # the first step always runs
    loose = predictor.predict(x, deadline_ms=60_000)
    assert loose.steps == predictor.steps and loose.deadline_met is True
    mid = predictor.predict(x, deadline_ms=60_000, budget_flops=predictor.cumulative_flops[1])
    assert len(mid.steps) == 2


def test_schedules():
    labels = torch.tensor([0, 1, 0, 1])
    right, wrong = torch.tensor([[0.9, 0.1], [0.1, 0.9]] * 2), torch.tensor([[0.1, 0.9], [0.9, 0.1]] * 2)
    # greedy = accuracy gain per FLOP: a useless cheap exit loses to a useful expensive one
    probs = [torch.stack([wrong, right], 1), torch.stack([right], 1)]
    assert greedy_schedule(probs, labels, [[1, 1], [10]]) == [(1, 0), (0, 0), (0, 1)]
    # a useful cheap exit goes first; zero-gain ties go to the cheaper step
    probs = [torch.stack([right, right], 1), torch.stack([right], 1)]
    assert greedy_schedule(probs, labels, [[1, 1], [10]]) == [(0, 0), (0, 1), (1, 0)]
    assert greedy_schedule(probs, labels, [[100, 100], [10]])[0] == (1, 0)
    assert explicit_schedule([1, 0, 0], [2, 1]) == [(1, 0), (0, 0), (0, 1)]
    with pytest.raises(SuperweightsError, match="once per exit"):
        explicit_schedule([1, 0], [2, 1])
    with pytest.raises(SuperweightsError, match="member index 5"):
        explicit_schedule([5], [2, 1])


# -- metrics on tiny tensors ----------------------------------------------------------------------


def test_metrics_by_hand():
    # 2 examples, 2 members, 2 classes
    p = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.7], [0.9, 0.1]]])
    y = torch.tensor([0, 1])
    r = point_metrics(p, y)
    mean = torch.tensor([[0.7, 0.3], [0.6, 0.4]])  # predictions 0, 0 -> one right
    assert r["accuracy"] == 0.5
    assert math.isclose(r["nll"], -(math.log(0.7) + math.log(0.4)) / 2, rel_tol=1e-6)
    # confidences 0.7 (correct) and 0.6 (wrong) fall in different 1/15 bins: ECE = (0.3 + 0.6) / 2
    assert math.isclose(r["ece"], (abs(0.7 - 1) + abs(0.6 - 0)) / 2, rel_tol=1e-6)
    assert r["disagreement"] == 0.5  # members disagree on example 2 only
    assert mean.shape == (2, 2)
    assert math.isclose(normalized_auc([1, 3], [0.5, 1.0]), 0.5 * 2 / 3)
    assert math.isclose(normalized_auc([2, 4, 8], [0.25, 0.5, 1.0]), (0.25 * 2 + 0.5 * 4) / 8)


# -- evaluator and CLI ----------------------------------------------------------------------------


def test_evaluate_cli_writes_files(exits_ckpt, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", str(exits_ckpt[1]), "--split", "val", "--out", str(out)]) == 0
    assert "AUC" in capsys.readouterr().out
    for name in ("anytime.csv", "budgeted.csv", "subsets.csv", "exits.csv", "anytime.png", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "anytime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "subsets.csv").read_text().splitlines()) == 1 + (2**2 - 1)
    assert len((out / "anytime.csv").read_text().splitlines()) == 1 + 6
    assert len((out / "exits.csv").read_text().splitlines()) == 1 + 6
    summary = json.loads((out / "summary.json").read_text())
    assert {"final_accuracy", "auc", "nll", "ece"} <= set(summary) and 0 <= summary["auc"] <= 1


def test_evaluate_cli_reads_a_model_on_storage(exits_ckpt, tmp_path, capsys, monkeypatch):
    """`superweights evaluate s3://.../model` (here file://, the same pyarrow code path): the same numbers as the
    folder itself, written to ./anytime-SPLIT (never into the temporary copy)."""
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", f"file://{exits_ckpt[1]}", "--split", "val"]) == 0
    assert "to anytime-val" in capsys.readouterr().out
    assert main(["evaluate", str(exits_ckpt[1]), "--split", "val", "--out", str(tmp_path / "direct")]) == 0
    got = json.loads((tmp_path / "anytime-val" / "summary.json").read_text())
    assert got == json.loads((tmp_path / "direct" / "summary.json").read_text())
    assert (tmp_path / "anytime-val" / "anytime.csv").read_text() == (tmp_path / "direct" / "anytime.csv").read_text()


def test_full_baseline_without_anytime_json(tmp_path):
    """A `full` checkpoint without exits nor anytime.json (e.g. written by Ray): computed on first use."""
    config = cfg('ensemble.members=["wrn-10-2","wrn-10-1","wrn-10-1"]', 'bank.method="full"')
    model = build_ensemble(config, DIGITS)
    save_checkpoint(tmp_path / "full", config, DIGITS, model, {"ensemble": {}, "members": {}})
    result, _ = run_evaluation(tmp_path / "full", "val", tmp_path / "ev")
    assert len(result["subsets"]) == 2**3 - 1 and len(result["anytime"]) == 3
    assert (tmp_path / "full" / "anytime.json").is_file()
    x = torch.rand(3, 1, 8, 8)
    ck = load_anytime(tmp_path / "full")
    assert {"combiner", "calibration", "early_exit"} <= set(ck.record)  # fitted on the validation split
    with torch.no_grad():
        torch.testing.assert_close(AnytimePredictor(ck.model, plain(ck.record)).predict(x).probs,
                                   ck.model(x).softmax(-1).mean(1), atol=1e-5, rtol=0)


def _cli_error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("superweights: error: ") and "\n" not in err
    return err


def test_bad_checkpoints_are_one_line_errors(exits_ckpt, tmp_path, capsys):
    src = exits_ckpt[1]
    assert "does not exist" in _cli_error(["evaluate", str(tmp_path / "nope")], capsys)
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    (missing / "weights.safetensors").unlink()
    assert "missing weights.safetensors" in _cli_error(["evaluate", str(missing)], capsys)
    for name, edit in [("names", lambda r: r.update(members=["a", "b"])),
                       ("flops", lambda r: r["step_flops"][0].__setitem__(0, 1)),
                       ("schedule", lambda r: r["schedule"].update(steps=[[0, 1], [0, 0]])),
                       ("keys", lambda r: r.pop("step_flops"))]:
        bad = tmp_path / name
        shutil.copytree(src, bad)
        record = json.loads((bad / "anytime.json").read_text())
        edit(record)
        (bad / "anytime.json").write_text(json.dumps(record))
        assert "anytime.json" in _cli_error(["evaluate", str(bad)], capsys)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "anytime.json").write_text("{")
    assert "not valid JSON" in _cli_error(["evaluate", str(broken)], capsys)
    assert "--split" in _cli_error(["evaluate", str(src), "--split", "train"], capsys)
    cfg_json = json.loads((src / "config.json").read_text())
    cfg_json["ensemble"]["exits"] = "none"
    mism = tmp_path / "mism"
    shutil.copytree(src, mism)
    (mism / "config.json").write_text(json.dumps(cfg_json))
    assert "does not match" in _cli_error(["evaluate", str(mism)], capsys)


def test_heterogeneous_members_with_different_exit_counts():
    config = cfg('ensemble.members=["resnet-18-16","mlp-256-2"]', "ensemble.exits=all", "anytime.schedule=member")
    model = build_ensemble(config, DIGITS).eval()
    assert model.num_exits == [4, 2]
    x = torch.rand(3, 1, 8, 8)
    with pytest.raises(SuperweightsError, match="forward_exits_list"):
        model.forward_exits(x)
    pred = AnytimePredictor(model, anytime_record(model, config, DIGITS))
    with torch.no_grad():
        torch.testing.assert_close(pred.predict(x).probs, model(x).softmax(-1).mean(1), atol=1e-5, rtol=0)

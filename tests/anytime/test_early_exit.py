"""Issue 15: per-input early exit (exact, only the running rows advance, mean FLOPs within budget on the data
the thresholds were fitted on), the fitted combiner (never loses along the schedule on validation), temperature
calibration, the evaluator's budgeted-batch curve, and records written before any of this."""

import csv
import json
import math
import shutil

import pytest
import torch

from anytime.budget import ConfidenceBudget, FlopsBudget, MeanFlopsBudget
from anytime.combine import Combiner
from anytime.early_exit import MARGIN, choose, confidence, steps_run, threshold_table
from anytime.evaluate import run_evaluation
from anytime.fit import fit_temperature, smoothed_nll
from anytime.predictor import AnytimePredictor
from anytime.record import FITTED, exit_logits
from anytime.store import load_anytime
from core.errors import SuperweightsError
from ensemble.data import load_data
from ensemble.metrics import accuracy, nll
from ray_jobs.cli import main


@pytest.fixture(scope="module")
def ckpt(exits_ckpt):
    return load_anytime(exits_ckpt[1])


@pytest.fixture(scope="module")
def predictor(ckpt):
    return AnytimePredictor.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def val(ckpt):
    """The validation split the record was fitted on, as one batch (images, labels)."""
    t = ckpt.config.train
    loader = load_data(ckpt.config.data, t.seed, t.batch_size, t.eval_batch_size).val
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def mid_level(predictor, x) -> float:
    """A level that stops some images early and lets others go on (median first-prefix confidence)."""
    first = predictor.predict(x, budget=FlopsBudget(predictor.min_flops)).probs
    return float(confidence(first).median())


# -- the per-input path is exact --------------------------------------------------------------------------


def test_a_stopped_input_has_exactly_the_fixed_prefix_probabilities(predictor, val):
    x = val[0]
    pred = predictor.predict(x, budget=ConfidenceBudget(mid_level(predictor, x)))
    counts = torch.tensor(pred.image_steps)
    assert len(set(pred.image_steps)) >= 2, "the level must stop some images and not others"
    cum = predictor.cumulative_flops
    for n in sorted(set(pred.image_steps)):
        rows = counts == n
        fixed = predictor.predict(x, budget=FlopsBudget(cum[n - 1]))
        assert len(fixed.steps) == n
        assert torch.equal(pred.probs[rows], fixed.probs[rows]), n  # bit for bit
        assert all(f == cum[n - 1] for f, c in zip(pred.image_flops, pred.image_steps) if c == n)
    assert pred.steps == predictor.steps[: max(pred.image_steps)] and pred.flops == cum[max(pred.image_steps) - 1]


def test_only_still_running_rows_are_advanced(predictor, val, monkeypatch):
    x = val[0][:40]
    rows_seen = []
    for member in predictor.members:
        original = member.advance

        def advance(h, k, original=original):
            rows_seen.append(len(h))
            return original(h, k)

        monkeypatch.setattr(member, "advance", advance)
    pred = predictor.predict(x, budget=ConfidenceBudget(mid_level(predictor, x)))
    counts = torch.tensor(pred.image_steps)
    running = [int((counts > i).sum()) for i in range(max(pred.image_steps))]
    assert rows_seen[-len(running):] == running and running[0] == len(x) and running[-1] < len(x)


def test_threshold_one_is_the_full_schedule_and_zero_the_first_step(predictor, val):
    x = val[0][:50]
    full, first = predictor.predict(x), predictor.predict(x, budget=FlopsBudget(predictor.min_flops))
    never = predictor.predict(x, budget=ConfidenceBudget(1.0))
    assert torch.equal(never.probs, full.probs) and never.steps == predictor.steps
    assert never.image_steps == [len(predictor.steps)] * len(x)
    always = predictor.predict(x, budget=ConfidenceBudget(0.0))
    assert torch.equal(always.probs, first.probs) and always.image_steps == [1] * len(x)
    assert always.image_flops == [predictor.min_flops] * len(x)
    saturated = torch.zeros(1, 10)
    saturated[0, 0] = 1.0  # a float32 softmax can be exactly 1: "1 = never confident" holds for it too
    assert steps_run(torch.stack([confidence(saturated)] * 3, 1), 1.0).tolist() == [3]


# -- mean FLOPs budgets -----------------------------------------------------------------------------------


def test_mean_flops_never_exceed_the_budget_on_the_fitted_data(predictor, val):
    x = val[0]
    cum = predictor.cumulative_flops
    means = []
    for budget in torch.linspace(cum[0], cum[-1] * 1.1, 23).tolist() + [e["bound"] for e in predictor.table]:
        pred = predictor.predict(x, budget=MeanFlopsBudget(budget))
        mean = sum(pred.image_flops) / len(x)
        assert mean <= budget, (budget, mean)
        assert max(pred.image_flops) <= cum[-1] and min(pred.image_flops) >= cum[0]
        means.append((budget, mean))
    means.sort()
    assert [m for _, m in means] == sorted(m for _, m in means)  # more budget never spends less
    assert means[-1][1] == cum[-1]  # a budget above the full schedule runs it for every image
    assert any(cum[0] < m < cum[-1] for _, m in means)  # and some budgets really stop images early


def test_mean_flops_below_the_first_step_or_without_a_table_is_a_clear_error(ckpt, predictor):
    with pytest.raises(SuperweightsError, match=f"minimum is {predictor.min_flops:,} FLOPs per image"):
        predictor.check_budget(MeanFlopsBudget(predictor.min_flops - 1))
    bare = AnytimePredictor(ckpt.model, {k: v for k, v in ckpt.record.items() if k not in FITTED})
    with pytest.raises(SuperweightsError, match="no early-exit thresholds"):
        bare.check_budget(MeanFlopsBudget(1e9))
    bare.check_budget(ConfidenceBudget(0.5))  # a confidence level needs no table


def test_threshold_table_on_known_scores():
    # 4 inputs, 3 steps costing 1, 2, 4 cumulative; confidences per prefix
    scores = torch.tensor([[0.9, 0.9, 0.9], [0.5, 0.95, 0.9], [0.4, 0.6, 0.99], [0.3, 0.3, 0.3]])
    correct = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    table = threshold_table(scores, correct, [1, 2, 4], points=7)
    bounds = [e["bound"] for e in table]
    assert bounds == sorted(bounds) and table[0]["confidence"] == 0.0 and table[0]["mean_flops"] == 1
    assert table[-1]["confidence"] == 1.0 and table[-1]["mean_flops"] == 4 and table[-1]["accuracy"] == 0.75
    assert all(e["bound"] <= e["target_mean_flops"] for e in table)
    assert choose(table, 0.99) is None and choose(table, 1)["confidence"] == 0.0 and choose(table, 99) is table[-1]
    # level 0.5: inputs 0 stops at step 1 (0.9 > 0.5), input 1 at step 2 (0.95), inputs 2 and 3 run all 3
    assert steps_run(scores, 0.5).tolist() == [1, 2, 2, 3]
    assert steps_run(scores, 0.5 + MARGIN).tolist() == [1, 2, 2, 3]


# -- the fitted combiner and calibration ------------------------------------------------------------------


def test_the_fitted_combiner_never_loses_validation_accuracy_along_the_schedule(ckpt, predictor, val):
    v = ckpt.record["validation"]
    assert v["examples"] == len(val[1]) and len(v["accuracy"]) == len(predictor.steps)
    assert all(b >= a for a, b in zip(v["accuracy"], v["accuracy"][1:]))
    assert v["accuracy"][-1] == max(v["accuracy"]) >= max(v["accuracy_plain"][:1])
    cum = predictor.cumulative_flops
    served = [accuracy(predictor.predict(val[0], budget=FlopsBudget(c)).probs, val[1]) for c in cum]
    assert all(b >= a for a, b in zip(served, served[1:])), served  # what the predictor serves, too
    Combiner.from_record(ckpt.record, predictor.steps).check(ckpt.record["num_exits"], "record")


def test_temperature_scaling_fits_overconfident_logits():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    logits = torch.randn(400, 5, generator=g)
    logits[torch.arange(400), labels] += 1.0
    logits *= 8  # ~65% accurate and nearly always sure: overconfident
    t = fit_temperature(logits, labels)
    assert t > 2
    assert nll((logits / t).softmax(-1), labels) < 0.5 * nll(logits.softmax(-1), labels)
    assert fit_temperature(torch.full((10, 3), 0.0), torch.zeros(10, dtype=torch.long)) == 1.0  # nothing to gain
    assert math.isfinite(smoothed_nll(logits.log_softmax(-1), labels))


def test_calibration_lowers_validation_nll_and_keeps_predictions(ckpt, val):
    logits, labels = exit_logits(ckpt.model, [val], "cpu")
    comb = Combiner.from_record(ckpt.record, ckpt.steps)
    cal, raw = comb.prefix_probs(logits), comb.uncalibrated().prefix_probs(logits)
    for c, r in zip(cal, raw):
        assert torch.equal(c.argmax(-1), r.argmax(-1))
        assert nll(c, labels) <= nll(r, labels) + 1e-3


# -- records without fitted parts, bad fitted parts -------------------------------------------------------


def test_an_older_record_gets_the_fitted_parts_on_load(exits_ckpt, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exits_ckpt[1], old)
    record = json.loads((old / "anytime.json").read_text())
    (old / "anytime.json").write_text(json.dumps({k: v for k, v in record.items() if k not in FITTED}))
    ck = load_anytime(old)
    assert set(FITTED) <= set(ck.record) and ck.record["schedule"] == record["schedule"]
    assert set(FITTED) <= set(json.loads((old / "anytime.json").read_text()))  # cached


@pytest.mark.parametrize("name, edit", [
    ("weights", lambda r: r["combiner"]["weights"][1].__setitem__(0, 5.0)),
    ("temperature", lambda r: r["calibration"]["prefix_temperatures"].__setitem__(0, -1.0)),
    ("shape", lambda r: r["combiner"]["weights"].pop()),
    ("level", lambda r: r["early_exit"]["table"][0].__setitem__("confidence", 2.0)),
    ("score", lambda r: r["early_exit"].__setitem__("score", "vibes")),
    ("table", lambda r: r["early_exit"]["table"][0].pop("bound")),
])
def test_bad_fitted_parts_are_one_line_errors(exits_ckpt, tmp_path, capsys, name, edit):
    bad = tmp_path / name
    shutil.copytree(exits_ckpt[1], bad)
    record = json.loads((bad / "anytime.json").read_text())
    edit(record)
    (bad / "anytime.json").write_text(json.dumps(record))
    assert main(["evaluate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("superweights: error: ") and "anytime.json" in err and "\n" not in err


# -- the evaluator ----------------------------------------------------------------------------------------


def test_evaluator_budgeted_batch_curve_matches_the_predictor(exits_ckpt, predictor, val, tmp_path):
    result, out = run_evaluation(exits_ckpt[1], "val", tmp_path / "ev")
    rows = list(csv.DictReader((out / "budgeted.csv").open()))
    assert len(rows) == len(predictor.table) >= 2
    assert [float(r["mean_flops"]) for r in rows] == sorted(float(r["mean_flops"]) for r in rows)
    for r in rows[:: max(1, len(rows) // 4)]:
        pred = predictor.predict(val[0], budget=ConfidenceBudget(float(r["threshold"])))
        assert math.isclose(sum(pred.image_flops) / len(val[1]), float(r["mean_flops"]), abs_tol=1e-3)
        assert math.isclose(accuracy(pred.probs, val[1]), float(r["accuracy"]))
    s = json.loads((out / "summary.json").read_text())
    assert s["combiner"] == "fitted" and {"plain", "uncalibrated", "budgeted", "at_fraction"} <= set(s)
    assert s["final_accuracy"] >= s["best_prefix_accuracy"]  # on the split it was fitted on
    assert set(s["at_fraction"]) == {"0.25", "0.5", "0.75"}
    for f, r in s["at_fraction"].items():
        assert r["budgeted_mean_flops"] is None or r["budgeted_mean_flops"] <= float(f) * s["total_flops"]
    header = next(csv.reader((out / "anytime.csv").open()))
    assert {"accuracy_plain", "nll_plain", "ece_plain", "nll_uncalibrated", "ece_uncalibrated"} <= set(header)
    assert (out / "anytime.png").read_bytes()[:4] == b"\x89PNG"

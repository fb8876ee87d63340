"""`anytime.exit_score` through `superweights train`: the early-exit table is fitted on the asked confidence,
stored in anytime.json, and the predictor loaded from the model folder stops images on that confidence."""

import json

import torch

from anytime.budget import ConfidenceBudget
from anytime.early_exit import confidence
from anytime.predictor import AnytimePredictor
from anytime.store import load_anytime
from ray_jobs import cli

from .conftest import TWO_MEMBERS, set_args, train_refusal

TINY = [TWO_MEMBERS, "train.epochs=1", "data.train_per_class=10", "ensemble.exits=all"]


def test_an_unknown_exit_score_is_one_line_exit_2(tmp_path, capsys):
    assert train_refusal(capsys, tmp_path, *TINY, 'anytime.exit_score="margin"') == \
        "superweights: error: anytime.exit_score must be one of max_prob, entropy, got 'margin'"


def test_entropy_exit_score_is_fitted_stored_and_used(tmp_path):
    out = tmp_path / "out"
    code = cli.main(["train", "--workers", "0", "--no-tracking", "--storage-path", str(tmp_path / "runs"),
                     "--out", str(out), *set_args(*TINY, 'anytime.exit_score="entropy"')])
    assert code == 0
    record = json.loads((out / "anytime.json").read_text())
    assert record["early_exit"]["score"] == "entropy" and record["early_exit"]["table"]
    predictor = AnytimePredictor.from_checkpoint(load_anytime(out))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    level = 0.5
    got = predictor.predict(x, budget=ConfidenceBudget(level))
    # every image that stopped before the end did so on its first step whose entropy confidence passed the level
    prefixes = predictor.predict(x, budget=ConfidenceBudget(1.0))  # full schedule, for the step count
    n = len(prefixes.steps)
    for i, k in enumerate(got.image_steps):
        assert 1 <= k <= n
        if k < n:
            assert confidence(got.probs[i:i + 1], "entropy").item() > level

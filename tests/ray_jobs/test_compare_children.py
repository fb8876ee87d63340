"""Which children `superweights compare` trains (pure: configs and plans, no MLflow, no training)."""

from collections import Counter
from pathlib import Path

from ray_jobs.compare import plan_children

CONFIG = str(Path(__file__).resolve().parents[2] / "configs/digits.toml")
SSN = ["ssn-repeat", "ssn-mask", "ssn-inter"]


def test_ssn_variants_that_upsample_nothing_are_trained_once_as_wavg():
    children = plan_children(CONFIG, [], [0.1, 1.0], 2, ["superweights", *SSN])
    per_budget = Counter((c.variant, c.budget) for c in children)
    # budget 0.1 upsamples 13 slots: three different models; budget 1.0 upsamples none: one model
    assert per_budget == {("superweights", 0.1): 2, ("superweights", 1.0): 2, ("ssn-repeat", 0.1): 2,
                          ("ssn-mask", 0.1): 2, ("ssn-inter", 0.1): 2, ("ssn-wavg", 1.0): 2}
    wavg = [c for c in children if c.variant == "ssn-wavg"]
    assert {c.config.bank.method for c in wavg} == {"ssn"} and [c.seed for c in wavg] == [0, 1]
    assert len({c.settings for c in children}) == len(children)  # every child is a different run


def test_one_asked_ssn_variant_keeps_its_name():
    children = plan_children(CONFIG, [], [1.0], 1, ["ssn-mask"])
    assert [(c.variant, c.config.bank.upsample) for c in children] == [("ssn-mask", "mask")]


def test_rows_name_the_learning_steps_so_runs_with_and_without_them_never_share_a_row():
    steps = ["bank.grouping=gradient", "bank.unshare_epoch=3"]
    assert [c.variant for c in plan_children(CONFIG, steps, [0.5], 1, ["superweights", "ssn-inter", "full"])] == [
        "superweights, gradient grouping + unsharing at epoch 3", "ssn-inter", "full"]
    assert [c.variant for c in plan_children(CONFIG, ["bank.unshare_epoch=2"], [0.5], 1, ["superweights"])] == [
        "superweights, unsharing at epoch 2"]
    assert [c.variant for c in plan_children(CONFIG, ["bank.ssn_groups=learned"], [0.5], 1, ["ssn-mask"])] == [
        "ssn-mask, learned groups"]


def test_report_only_labels_older_runs_from_their_logged_config():
    """Runs logged before the labels named the steps carry a bare "superweights" tag; their params say which."""
    import pandas as pd

    from ray_jobs.compare_report import _label_of

    def run(tag, **params):
        return pd.Series({"tags.superweights.variant": tag, **{f"params.{k}": v for k, v in params.items()}})

    assert _label_of(run("superweights", **{"bank.grouping": "gradient", "bank.unshare_epoch": "10"})) == (
        "superweights, gradient grouping + unsharing at epoch 10")
    assert _label_of(run("superweights", **{"bank.grouping": "depth", "bank.unshare_epoch": "0"})) == "superweights"
    assert _label_of(run("superweights")) == "superweights"  # no params logged: the defaults
    assert _label_of(run("ssn-inter", **{"bank.ssn_groups": "learned"})) == "ssn-inter, learned groups"
    assert _label_of(run("member wrn-10-1", **{"bank.grouping": "gradient"})) == "member wrn-10-1"


def test_the_evaluation_batch_is_not_part_of_a_childs_settings():
    """Runs logged with the old default train.eval_batch_size = 512 stay reusable under the automatic 0 (their
    settings hash is what it was), and any evaluation batch hashes alike: results do not depend on it. What
    training depends on still changes the hash."""
    import hashlib
    import json

    auto = plan_children(CONFIG, [], [0.5], 1, ["superweights", "full"])
    old = plan_children(CONFIG, ["train.eval_batch_size=512"], [0.5], 1, ["superweights", "full"])
    other = plan_children(CONFIG, ["train.eval_batch_size=64"], [0.5], 1, ["superweights", "full"])
    assert [c.config.train.eval_batch_size for c in auto + old + other] == [0, 0, 512, 512, 64, 64]
    assert [c.settings for c in auto] == [c.settings for c in old] == [c.settings for c in other]
    for c in old:  # the hash as it was computed before the automatic batch existed
        before = {k: v for k, v in c.config.to_dict().items() if k != "serve"}
        assert c.settings == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    other_lr = plan_children(CONFIG, ["train.lr=0.01"], [0.5], 1, ["superweights", "full"])
    assert not {c.settings for c in auto} & {c.settings for c in other_lr}

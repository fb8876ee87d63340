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

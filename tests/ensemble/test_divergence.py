"""A diverged run stops at the first non-finite step with one line naming where and a likely cause."""

import pytest

from ensemble.config import load_config
from ensemble.loop import Diverged, fit

TINY = ["data.train_per_class=10", 'ensemble.members=["wrn-10-1"]', "train.batch_size=50", "train.epochs=2"]


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step_and_writes_nothing(tmp_path):
    config = load_config(None, [*TINY, "train.lr=1e6"])
    with pytest.raises(Diverged, match=r"^training diverged at epoch \d, step \d+: the training loss is not finite "
                                       r"\(NaN or infinity\); lower train.lr \(now 1e\+06\); a very small bank.budget"):
        fit(config, tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()  # no model files as if final


def test_a_sane_run_does_not_trip_the_check():
    result = fit(load_config(None, TINY), None, progress=False, log=lambda s: None)
    assert len(result.history) == 2

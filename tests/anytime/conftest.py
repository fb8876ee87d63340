import pytest

from anytime.record import finish_checkpoint
from ensemble.config import load_config
from ensemble.data import DatasetInfo
from ensemble.loop import fit

DIGITS = DatasetInfo("digits", 1, (8, 8), 10, (0.3,), (0.37,))  # shapes only (untrained models, no data read)

TINY = ('ensemble.members=["wrn-10-2","wrn-10-1"]', "data.train_per_class=10", "train.epochs=1",
        "train.batch_size=32", "bank.budget=0.4")


def cfg(*overrides):
    return load_config(None, [*TINY, *overrides])


@pytest.fixture(scope="session")
def exits_ckpt(tmp_path_factory):
    """A trained SuperWeight ensemble with an exit after every stage (3 exits per member), its final checkpoint
    with the anytime record as the training pipeline writes it."""
    out = tmp_path_factory.mktemp("anytime-ckpt")
    result = fit(cfg("ensemble.exits=all"), out, progress=False, log=lambda s: None, finish=finish_checkpoint)
    return result, out

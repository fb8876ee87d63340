import pytest

from ensemble.config import load_config
from ensemble.data import DatasetInfo

DIGITS = DatasetInfo("digits", 1, (8, 8), 10, (0.3,), (0.37,))
CIFAR10 = DatasetInfo("cifar10", 3, (32, 32), 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def cfg(*overrides):
    return load_config(None, list(overrides))


@pytest.fixture
def small_config():
    """Two WRNs of different width and depth: cheap, but heterogeneous in every way the plan cares about."""
    return cfg('ensemble.members=["wrn-16-2","wrn-10-1"]', "bank.budget=0.3")

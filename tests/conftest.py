import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """As `superweights serve` (--threads 1): on shared cores two spinning intra-op threads make every small
    forward many times slower. Restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

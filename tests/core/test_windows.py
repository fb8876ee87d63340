import pytest
import torch

from core.windows import cyclic_windows


@pytest.mark.parametrize("params, starts, size", [
    (10, [0, 5], 4),          # disjoint, no wrap (high budget)
    (10, [0, 3, 6, 9], 4),    # overlapping, the last one wraps
    (7, [0, 3], 30),          # windows several times longer than theta (low budget tiling)
    (1, [0, 0], 5),           # a single entry
])
def test_windows_read_theta_cyclically_and_backward_is_exact(params, starts, size):
    theta = torch.randn(params, dtype=torch.float64, requires_grad=True)
    w = cyclic_windows(theta, starts, size)
    expected = torch.stack([theta[[(s + i) % params for i in range(size)]] for s in starts])
    assert torch.equal(w, expected)
    assert torch.autograd.gradcheck(lambda t: cyclic_windows(t, starts, size), (theta,))

import pytest

from core.allocation import allocate_budget, largest_remainder
from core.errors import SuperweightsError


@pytest.mark.parametrize("total", [5, 7, 97, 1000, 1001])
def test_largest_remainder_is_exact_and_at_least_one(total):
    weights = [1, 3, 1000, 7, 50]
    shares = largest_remainder(total, weights)
    assert sum(shares) == total
    assert min(shares) >= 1


def test_largest_remainder_is_proportional_when_it_divides():
    assert largest_remainder(20, [1, 3, 6]) == [2, 6, 12]


def test_allocation_at_full_size_gives_one_template_each():
    sizes = [144, 2304, 9216]
    assert allocate_budget(sum(sizes), sizes, [3, 2, 1], 4) == sizes


def test_high_budget_goes_to_most_used_blocks_up_to_the_cap():
    sizes = [10, 10, 10]
    usage = [1, 5, 3]
    # 30 + 35 extra: block 1 (most used) takes 3 more templates (cap 4), block 2 the remaining 5.
    assert allocate_budget(65, sizes, usage, 4) == [10, 40, 15]


def test_cap_is_lifted_only_when_every_block_is_capped():
    sizes = [10, 10]
    params = allocate_budget(95, sizes, [2, 1], 4)
    assert sum(params) == 95 and params[0] >= 40 and params[1] >= 40


def test_below_one_per_block_names_the_minimum():
    with pytest.raises(SuperweightsError, match="minimum is 3"):
        allocate_budget(2, [5, 5, 5], [1, 1, 1], 4)

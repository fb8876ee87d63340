import itertools
import random

import pytest
import torch

from core.errors import SuperweightsError
from core.grouping import (
    coefficient_transfer,
    components,
    cropped_cosine,
    gradient_plan,
    partition,
    unshare_keys,
)
from core.plan import SlotSpec, build_plan


def canonical(labels):
    groups = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, set()).add(i)
    return sorted(map(frozenset, groups.values()), key=min)


def test_union_find_is_transitive():
    assert components(5, [(0, 1), (1, 2), (3, 4)]) == [0, 0, 0, 3, 3]


@pytest.mark.parametrize("seed", range(5))
def test_merge_gives_the_same_partition_for_every_order(seed):
    rng = random.Random(seed)
    n = 6
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.3]
    expected = canonical(components(n, edges))
    for perm in itertools.permutations(range(n)):
        relabel = {old: new for new, old in enumerate(perm)}
        shuffled = [(relabel[a], relabel[b]) for a, b in rng.sample(edges, len(edges))]
        got = canonical(components(n, shuffled))
        inverse = {new: old for old, new in relabel.items()}
        assert sorted((frozenset(inverse[i] for i in g) for g in got), key=min) == expected


def test_higher_threshold_never_gives_fewer_groups():
    torch.manual_seed(0)
    vecs = torch.randn(12, 20) + torch.randn(1, 20)  # correlated
    sim = torch.nn.functional.cosine_similarity(vecs[:, None], vecs[None], dim=-1).double()
    counts = [len(set(partition(sim, t))) for t in torch.linspace(-1, 1, 41).tolist()]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 12


def test_cropped_cosine_uses_the_common_top_left_block():
    a = torch.zeros(4, 4, 3, 3)
    a[:2, :2] = 1.0
    b = torch.ones(2, 2, 3, 3)
    assert cropped_cosine(a, b) == pytest.approx(1.0)
    assert cropped_cosine(a, -b) == pytest.approx(-1.0)


def _grads(slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s.shape, generator=g) for s in slots]


def test_regrouped_plan_keeps_the_exact_budget(slots):
    base = build_plan(slots, 0.3, depth_bins=1)
    new, used = gradient_plan(base, _grads(slots), threshold=0.5, step=0.1, tries=3, depth_bins=1, share_coefficients=True)
    assert new.bank_params == base.budget and used == 0.5
    assert len(new.groups) > len(base.groups)  # random gradients are dissimilar: groups split


def test_same_gradients_same_groups(slots):
    base = build_plan(slots, 0.3, depth_bins=1)
    a, _ = gradient_plan(base, _grads(slots, 3), 0.1, 0.1, 3, 1, True)
    b, _ = gradient_plan(base, _grads(slots, 3), 0.1, 0.1, 3, 1, True)
    assert a.slot_group == b.slot_group and a.to_json() == b.to_json()


SAME_SHAPE = [SlotSpec(m, "conv", "conv3x3", (16, 16, 3, 3)) for m in range(3)]  # one block until split


def test_threshold_is_lowered_until_a_plan_fits():
    base = build_plan(SAME_SHAPE, 2)
    grads = [torch.ones(16, 16, 3, 3), -torch.ones(16, 16, 3, 3), torch.ones(16, 16, 3, 3)]  # cosines +-1
    new, used = gradient_plan(base, grads, threshold=0.9, step=1.0, tries=4, depth_bins=4, share_coefficients=True)
    # at 0.9 slots {0, 2} and {1} form 2 groups = 2 blocks: fits a budget of 2
    assert used == 0.9 and len(new.groups) == 2 and new.bank_params == 2
    tight = build_plan(SAME_SHAPE, 1)
    new, used = gradient_plan(tight, grads, threshold=0.9, step=1.0, tries=4, depth_bins=4, share_coefficients=True)
    assert used == pytest.approx(-1.1) and len(new.groups) == 1 and new.bank_params == 1


def test_search_stops_with_a_clear_error():
    grads = [torch.ones(16, 16, 3, 3), -torch.ones(16, 16, 3, 3), torch.ones(16, 16, 3, 3)]
    with pytest.raises(SuperweightsError, match="no gradient grouping fits bank.budget=1: tried grouping.threshold "
                                                "from 0.9 down to 0.7.*needs at least 2 parameters"):
        gradient_plan(build_plan(SAME_SHAPE, 1), grads, threshold=0.9, step=0.1, tries=3, depth_bins=4,
                      share_coefficients=True)


def test_unsharing_splits_conflicting_sets_and_transfers_values(slots):
    plan = build_plan(slots, 0.3)
    g = torch.Generator().manual_seed(0)
    member0 = torch.randn(plan.coefficient_params, generator=g)
    agree, conflict = member0.clone(), -member0
    same = unshare_keys(plan, [member0, agree], 0.9)
    assert len(set(same)) == plan.num_coef_sets
    split = unshare_keys(plan, [member0, conflict], 0.9)
    new = build_plan(slots, plan.budget, coef_of=split, group_of=plan.slot_group)
    assert new.num_coef_sets == len(slots)  # every shared set split in two
    assert [b.params for b in new.blocks] == [b.params for b in plan.blocks]
    index = coefficient_transfer(plan, new)
    old = torch.arange(plan.coefficient_params, dtype=torch.float32)
    moved = old[index]
    for i in range(len(slots)):  # each slot's coefficient rows are unchanged by the split
        for row in plan.slot_cells(i):
            for bid in row:
                ob, nb = plan.blocks[bid], new.blocks[bid]
                o = ob.coef_offset + ob.coef_sets.index(plan.slot_coef[i]) * ob.templates
                n = nb.coef_offset + nb.coef_sets.index(new.slot_coef[i]) * nb.templates
                assert torch.equal(moved[n : n + nb.templates], old[o : o + ob.templates])

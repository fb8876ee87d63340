import json

import pytest

from core.errors import SuperweightsError
from core.plan import Plan, SlotSpec, build_plan, depth_bin_assignment, minimum_budget


def test_depth_bins_give_extra_layers_to_first_bins(slots):
    keys = depth_bin_assignment(slots, 2)
    # four conv3x3 per member -> bins of 2 and 2; the single linear goes to bin 0
    assert [k for k in keys[:6]] == [
        ("conv3x3", 0, 0), ("conv3x3", 0, 1), ("conv3x3", 1, 0), ("conv3x3", 1, 1), ("conv1x1", 0, 0), ("linear", 0, 0)
    ]
    keys3 = depth_bin_assignment(slots, 3)
    assert [k[1:] for k in keys3[:4]] == [(0, 0), (0, 1), (1, 0), (2, 0)]


@pytest.mark.parametrize("budget", [1, 2, 3, 97, 1009, 7919, 10007, 65537])
def test_integer_budgets_are_exact(slots, budget):
    minimum = minimum_budget(slots)
    if budget < minimum:
        with pytest.raises(SuperweightsError, match=f"minimum is {minimum}"):
            build_plan(slots, budget)
        return
    plan = build_plan(slots, budget)
    assert plan.bank_params == budget == plan.budget


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 0.83, 1.0, 1.5, 2.0])
def test_fraction_budgets_are_exact(slots, ratio):
    total = sum(s.numel for s in slots)
    plan = build_plan(slots, ratio)
    assert plan.bank_params == plan.budget == round(ratio * total)


def test_minimum_budget_is_one_per_block(slots):
    minimum = minimum_budget(slots)
    plan = build_plan(slots, minimum)
    assert minimum == len(plan.blocks)
    assert all(b.params == 1 for b in plan.blocks)
    with pytest.raises(SuperweightsError, match=f"bank.budget={minimum - 1} is too small: the minimum is {minimum}"):
        build_plan(slots, minimum - 1)


def test_blocks_are_grid_cells_at_distinct_channel_counts(slots):
    plan = build_plan(slots, 0.5, depth_bins=1)
    g = next(g for g in plan.groups if g.kind == "conv3x3")
    assert g.out_cuts == [16, 32, 64] and g.in_cuts == [3, 16, 32]
    assert plan.blocks[g.blocks[(1, 1)]].shape == (16, 13, 3, 3)
    assert plan.blocks[g.blocks[(2, 2)]].shape == (32, 16, 3, 3)


def test_cells_no_slot_covers_get_no_block():
    tall, wide = SlotSpec(0, "a", "conv3x3", (32, 16, 3, 3)), SlotSpec(1, "a", "conv3x3", (16, 32, 3, 3))
    plan = build_plan([tall, wide], 0.5)
    assert set(plan.groups[0].blocks) == {(0, 0), (0, 1), (1, 0)}  # [16:32, 16:32] is nobody's


def test_every_bank_entry_is_read_by_some_template(slots):
    for budget in (minimum_budget(slots) + 5, 999, 0.3, 1.0, 1.7):
        plan = build_plan(slots, budget)
        for b in plan.blocks:
            read = set()
            for s in b.window_starts():
                read.update((s + j) % b.params for j in range(b.size))
            assert read == set(range(b.params))
            assert 2 <= b.templates


def test_high_budget_adds_templates_not_shapes(slots):
    low, high = build_plan(slots, 1.0), build_plan(slots, 2.0)
    assert [b.shape for b in low.blocks] == [b.shape for b in high.blocks]
    assert sum(b.templates for b in high.blocks) > sum(b.templates for b in low.blocks)
    assert all(b.templates <= 4 for b in high.blocks)


def test_corresponding_slots_share_coefficient_sets(slots):
    shared = build_plan(slots, 0.5)
    assert shared.slot_coef[1] == shared.slot_coef[7]  # conv1 of both members
    assert len(set(shared.slot_coef[:6])) == 6  # never within a member
    unshared = build_plan(slots, 0.5, share_coefficients=False)
    assert len(set(unshared.slot_coef)) == len(slots)


def test_plan_json_round_trip(slots):
    plan = build_plan(slots, 1234)
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.to_json() == plan.to_json()
    assert again.slot_cells(3) == plan.slot_cells(3)


def test_max_templates_below_two_is_rejected(slots):
    with pytest.raises(SuperweightsError, match="max_templates must be >= 2"):
        build_plan(slots, 0.5, max_templates=1)

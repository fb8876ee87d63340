import math

import pytest

from core.errors import SuperweightsError
from core.plan import minimum_budget
from ensemble.methods import make_plan, plan_summary
from ensemble.planning import member_slots

from .conftest import CIFAR10, DIGITS, cfg

DEFAULT = cfg()  # configs/digits.toml members: wrn-16-4, wrn-16-2, wrn-10-4, wrn-10-2


def test_default_slots_are_every_conv_and_linear_in_forward_order():
    slots = member_slots(DEFAULT, DIGITS)
    first = [s for s in slots if s.member == 3]  # wrn-10-2: stem, 3 blocks x 2 convs, 3 shortcuts, fc
    assert [s.name for s in first] == [
        "stem", "stages.0.0.conv1", "stages.0.0.conv2", "stages.0.0.shortcut",
        "stages.1.0.conv1", "stages.1.0.conv2", "stages.1.0.shortcut",
        "stages.2.0.conv1", "stages.2.0.conv2", "stages.2.0.shortcut", "head.4",
    ]
    assert first[-1].kind == "linear" and first[0].shape == (16, 1, 3, 3)


@pytest.mark.parametrize("budget", [2, 3, 5, 7, 101, 7919, 104729, 1299709, 2000003])
def test_integer_budgets_including_primes_are_exact(budget):
    slots = member_slots(DEFAULT, DIGITS)
    minimum = minimum_budget(slots)
    if budget < minimum:
        with pytest.raises(SuperweightsError, match=f"minimum is {minimum}"):
            make_plan(DEFAULT, DIGITS, slots)
            make_plan(cfg(f"bank.budget={budget}"), DIGITS, slots)
        return
    plan = make_plan(cfg(f"bank.budget={budget}"), DIGITS, slots)
    assert plan.bank_params == budget


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1, 0.25, 0.5, 0.83, 1.0, 1.37, 2.0])
def test_ratio_budgets_are_exact(ratio):
    s = plan_summary(cfg(f"bank.budget={ratio}"), DIGITS)
    assert s["bank_params"] == s["budget"] == round(ratio * s["slot_weights"])
    assert s["total_params"] == s["bank_params"] + s["coefficient_params"] + s["private_params"]


def test_minimum_budget_and_below():
    slots = member_slots(DEFAULT, DIGITS)
    minimum = minimum_budget(slots)
    assert make_plan(cfg(f"bank.budget={minimum}"), DIGITS, slots).bank_params == minimum
    with pytest.raises(SuperweightsError, match=f"the minimum is {minimum} \\(one parameter per block\\)"):
        make_plan(cfg(f"bank.budget={minimum - 1}"), DIGITS, slots)


def test_high_budget_adds_templates_never_flops():
    low, high = plan_summary(cfg("bank.budget=1.0"), DIGITS), plan_summary(cfg("bank.budget=2.0"), DIGITS)
    assert [m["flops"] for m in low["members"]] == [m["flops"] for m in high["members"]]
    templates = lambda s: sum(b["templates"] for g in s["groups"] for b in g["blocks"])  # noqa: E731
    assert templates(high) > templates(low)


def test_summary_fields_and_reference_counts():
    s = plan_summary(cfg('ensemble.members=["wrn-28-10","wrn-16-4"]', "data.name=cifar10"), CIFAR10)
    assert {"budget", "bank_params", "coefficient_params", "private_params", "total_params",
            "full_ensemble_params", "members", "groups"} <= set(s)
    assert s["members"][0] == {"name": "wrn-28-10", "params": 36_479_194, "flops": s["members"][0]["flops"]}
    # WRN-28-10 on 32x32: ~5.25 GMACs -> ~10.5 GFLOPs (2 x MACs)
    assert 10.4e9 < s["members"][0]["flops"] < 10.6e9
    assert s["full_ensemble_params"] == sum(m["params"] for m in s["members"])
    for g in s["groups"]:
        assert set(g) == {"id", "kind", "slots", "blocks"}
        assert all(set(b) == {"shape", "templates", "params"} for b in g["blocks"])


def test_full_method_counts_equal_sum_of_members():
    s = plan_summary(cfg("bank.method=\"full\""), DIGITS)
    assert s["total_params"] == s["full_ensemble_params"] == sum(m["params"] for m in s["members"])
    assert s["bank_params"] == 0 and s["groups"] == []


def test_flops_are_twice_macs_for_a_known_member():
    s = plan_summary(cfg('ensemble.members=["wrn-10-1"]'), DIGITS)
    # stem 16x1x3x3 on 8x8, stage1 2 convs 16x16x3x3 on 8x8, stage2 (16->32, 32->32 on 4x4 + 1x1 shortcut),
    # stage3 (32->64, 64->64 on 2x2 + 1x1 shortcut), fc 64->10
    macs = (16 * 9 * 64) + 2 * (16 * 16 * 9 * 64) + (32 * 16 * 9 * 16 + 32 * 32 * 9 * 16 + 32 * 16 * 16) \
        + (64 * 32 * 9 * 4 + 64 * 64 * 9 * 4 + 64 * 32 * 4) + 640
    assert s["members"][0]["flops"] == 2 * macs
    assert math.isclose(s["budget_ratio"], 0.5, rel_tol=1e-4)

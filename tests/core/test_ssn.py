import json
import math

import pytest
import torch

from core.errors import BudgetTooSmallError, SuperweightsError
from core.plan import SlotSpec
from core.ssn import (
    UPSAMPLERS,
    SSNBank,
    SSNPlan,
    build_ssn_plan,
    inter_grid,
    inter_upsample,
    minimum_ssn_budget,
    ssn_groups,
)
from tests.init_reference import reference_std

from .conftest import two_width_slots

SLOTS = two_width_slots()
TOTAL = sum(s.numel for s in SLOTS)


def make(budget, upsample="repeat", mode="one", max_templates=4, seed=0):
    plan = build_ssn_plan(SLOTS, budget, ssn_groups(SLOTS, mode, 4), max_templates, upsample)
    return plan, SSNBank(plan, torch.Generator().manual_seed(seed))


def group_vector(bank, slot):
    g = bank.plan.groups[bank.plan.slot_layout[slot].group]
    return bank.bank.detach()[g.offset : g.offset + g.params]


def upsampled(plan):
    return [i for i, lay in enumerate(plan.slot_layout) if lay.mode != "wavg"]


# -- the defining property of each upsampler -----------------------------------------------------


def test_repeat_is_periodic_in_the_group_size():
    plan, bank = make(0.1, "repeat")
    (p,) = [g.params for g in plan.groups]
    ids = upsampled(plan)
    assert ids and all(plan.slot_layout[i].mode == "repeat" for i in ids)
    for i, w in enumerate(bank()):
        if i in ids:
            flat = w.detach().flatten()
            assert torch.equal(flat[:-p], flat[p:]), plan.slots[i]
            # one period is the group vector, read from the slot's phase, times the slot's gain
            theta = group_vector(bank, i)
            expected = torch.roll(theta, -plan.slot_layout[i].phase) * bank.gains[i]
            torch.testing.assert_close(flat[:p], expected)


def test_mask_copy_zero_is_the_group_vector_and_other_copies_are_masked():
    plan, bank = make(0.1, "mask")
    with torch.no_grad():  # masks as training leaves them: anything but 1
        bank.coefficients.normal_()
    raw = bank.raw_weights()
    for i in upsampled(plan):
        assert plan.slot_layout[i].mode == "mask"
        theta = group_vector(bank, i)
        p, flat = theta.numel(), raw[i].detach().flatten()
        assert torch.equal(flat[:p], theta)
        mask = bank.slot_coefficients(i).detach()
        assert mask.numel() == flat.numel() - p
        assert torch.equal(flat[p:], theta.repeat(math.ceil(flat.numel() / p))[p : flat.numel()] * mask)
    assert plan.mask_params == sum(plan.slots[i].numel - plan.groups[0].params for i in upsampled(plan))


def test_inter_is_the_identity_at_equal_size():
    small = torch.randn(6, 4 * 3 * 3)
    torch.testing.assert_close(inter_upsample(small, (6, 4, 3, 3)), small.view(6, 4, 3, 3), rtol=0, atol=1e-6)
    assert inter_grid(6 * 36, 6, 36) == (6, 36)


def test_inter_interpolates_a_small_matrix_keeping_its_corners():
    plan, bank = make(0.1, "inter")
    raw = bank.raw_weights()
    for i in upsampled(plan):
        lay, spec = plan.slot_layout[i], plan.slots[i]
        h, w = lay.grid
        assert h <= spec.shape[0] and w <= spec.numel // spec.shape[0] and h * w >= plan.groups[0].params
        theta = group_vector(bank, i)
        small = torch.roll(theta, -lay.phase).repeat(2)[: h * w].view(h, w)
        out = raw[i].detach().reshape(spec.shape[0], -1)
        for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # align_corners=True keeps the corners exactly
            torch.testing.assert_close(out[r, c], small[r, c])


@pytest.mark.parametrize("params,out,cols", [(1, 3, 5), (7, 3, 5), (14, 3, 5), (15, 3, 5), (100, 64, 288), (5, 1, 9)])
def test_inter_grid_reads_every_entry_without_downsampling(params, out, cols):
    h, w = inter_grid(params, out, cols)
    assert 1 <= h <= out and 1 <= w <= cols and h * w >= params


# -- wavg ----------------------------------------------------------------------------------------


def test_wavg_mixes_disjoint_consecutive_windows():
    plan, bank = make(1.0, "repeat")
    (p,) = [g.params for g in plan.groups]
    raw = bank.raw_weights()
    theta = group_vector(bank, 0)
    for i, lay in enumerate(plan.slot_layout):
        s = plan.slots[i].numel
        assert lay.mode == "wavg" and lay.templates == max(1, min(4, p // s))
        windows = torch.roll(theta, -lay.phase)[: lay.templates * s].view(lay.templates, s)
        torch.testing.assert_close(raw[i].detach().flatten(), bank.slot_coefficients(i).detach() @ windows)


def test_wavg_slots_together_read_the_whole_vector_at_high_budgets():
    for budget in (2.0, 8.0, 3 * TOTAL + 7):
        plan, _ = make(budget, "repeat", "depth")
        for g in plan.groups:
            assert sum(plan.slot_layout[i].templates * plan.slots[i].numel for i in g.slots) >= g.params


# -- budgets -------------------------------------------------------------------------------------


BUDGETS = [4, 5, 7, 13, 97, 1009, 7919, 65537, 104729, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.3, 2.0]


@pytest.mark.parametrize("upsample", UPSAMPLERS)
@pytest.mark.parametrize("mode", ["one", "depth"])
def test_budget_is_exact(upsample, mode):
    for budget in BUDGETS:
        plan = build_ssn_plan(SLOTS, budget, ssn_groups(SLOTS, mode, 4), 4, upsample)
        expected = budget if isinstance(budget, int) else round(budget * TOTAL)
        assert plan.budget == plan.bank_params == expected, budget
        offsets = [g.offset for g in plan.groups]
        assert offsets == [sum(g.params for g in plan.groups[:k]) for k in range(len(plan.groups))]
        assert plan.coefficient_params == sum(lay.coef_count for lay in plan.slot_layout)
        if upsample != "mask":
            assert plan.mask_params == 0


def test_budget_is_split_over_groups_by_total_slot_size():
    plan = build_ssn_plan(SLOTS, 0.5, ssn_groups(SLOTS, "depth", 4), 4, "repeat")
    for g in plan.groups:
        size = sum(SLOTS[i].numel for i in g.slots)
        assert abs(g.params - size / 2) <= 1


def test_minimum_budget_is_one_parameter_per_group():
    groups = ssn_groups(SLOTS, "depth", 4)
    assert minimum_ssn_budget(groups) == 4
    with pytest.raises(BudgetTooSmallError, match=r"^bank.budget=3 is too small: the minimum is 4 \(one parameter per group\)$") as e:
        build_ssn_plan(SLOTS, 3, groups, 4, "repeat")
    assert e.value.minimum == 4
    for upsample in UPSAMPLERS:
        plan = build_ssn_plan(SLOTS, 4, groups, 4, upsample)
        assert all(torch.isfinite(w).all() for w in SSNBank(plan)())


def test_bad_settings_are_clear_errors():
    with pytest.raises(SuperweightsError, match="bank.upsample"):
        build_ssn_plan(SLOTS, 0.5, [0] * len(SLOTS), 4, "warp")
    with pytest.raises(SuperweightsError, match="SSN groups"):
        ssn_groups(SLOTS, "random", 4)
    with pytest.raises(SuperweightsError, match="pre-training"):
        ssn_groups(SLOTS, "learned", 4)


# -- groups ----------------------------------------------------------------------------------------


def test_groups_one_and_depth_ignore_the_kernel_kind():
    assert ssn_groups(SLOTS, "one") == [0] * len(SLOTS)
    depth = ssn_groups(SLOTS, "depth", 3)
    assert depth == [0, 0, 1, 1, 2, 2] * 2  # per member, 6 slots in 3 bins, kinds mixed
    plan = build_ssn_plan(SLOTS, 0.5, depth, 4, "repeat")
    assert {SLOTS[i].kind for i in plan.groups[2].slots} == {"conv1x1", "linear"}


# -- bank ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upsample", UPSAMPLERS)
@pytest.mark.parametrize("budget", [0.01, 0.1, 0.5, 1.0, 2.0])
def test_shapes_and_reference_std_at_init(upsample, budget):
    plan, bank = make(budget, upsample, "depth")
    weights = bank()
    for spec, w in zip(plan.slots, weights):
        assert w.shape == spec.shape
        if w.numel() >= 1000:
            assert w.std().item() == pytest.approx(reference_std(spec.shape), rel=0.10), spec


@pytest.mark.parametrize("upsample", UPSAMPLERS)
@pytest.mark.parametrize("budget", [0.02, 0.3, 1.0, 2.0])
def test_every_bank_entry_gets_gradient(upsample, budget):
    plan, bank = make(budget, upsample, "depth")
    torch.manual_seed(1)
    loss = sum((w * torch.randn_like(w)).sum() for w in bank())
    loss.backward()
    assert (bank.bank.grad != 0).all()
    if plan.coefficient_params:
        assert (bank.coefficients.grad != 0).any()


def test_same_shape_slots_of_a_group_are_not_hard_tied():
    slots = [SlotSpec(0, f"c{i}", "conv3x3", (16, 16, 3, 3)) for i in range(3)]
    for upsample in ("repeat", "inter"):
        plan = build_ssn_plan(slots, 500, [0, 0, 0], 4, upsample)
        w = SSNBank(plan, torch.Generator().manual_seed(0))()
        assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_plan_round_trips_through_json_and_rebuilds_the_same_bank():
    for upsample in UPSAMPLERS:
        plan, bank = make(0.3, upsample, "depth")
        again = SSNPlan.from_json(json.loads(json.dumps(plan.to_json())))
        assert again == plan
        other = SSNBank(again, torch.Generator().manual_seed(0))
        for a, b in zip(bank(), other()):
            assert torch.equal(a, b)
    with pytest.raises(SuperweightsError, match="not an SSN plan"):
        SSNPlan.from_json({"method": "superweights"})


def test_aligned_layout_starts_every_slots_template_k_at_the_same_place():
    big = max(s.numel for s in SLOTS)
    plan = build_ssn_plan(SLOTS, 4 * big, [0] * len(SLOTS), 4, "repeat", layout="aligned")
    assert all(lay.mode == "wavg" and lay.templates == 4 for lay in plan.slot_layout)
    bank = SSNBank(plan, torch.Generator().manual_seed(0), coef_init="uniform")
    theta = bank.bank.detach()
    raw = bank.raw_weights()
    for i, spec in enumerate(plan.slots):
        windows = torch.stack([theta[k * big : k * big + spec.numel] for k in range(4)])
        torch.testing.assert_close(raw[i].detach().flatten(), windows.sum(0) / 2)


# -- subset generation (issue 12: each member-parallel worker generates only what it runs) --------------


def _loss_grads(bank, weights, ids, seed=5):
    g = torch.Generator().manual_seed(seed)
    loss = sum((weights[i] * torch.randn(weights[i].shape, generator=g)).sum() for i in ids)
    bank.zero_grad(set_to_none=True)
    loss.backward()
    coef = bank.coefficients.grad
    return bank.bank.grad.clone(), None if coef is None else coef.clone()


@pytest.mark.parametrize("upsample", UPSAMPLERS)
@pytest.mark.parametrize("mode", ["one", "depth"])
@pytest.mark.parametrize("budget", [4, 0.02, 0.1, 0.5, 2.0, 8.0])
def test_subset_generation_is_the_full_generation_on_the_requested_slots(upsample, mode, budget):
    plan, bank = make(budget, upsample, mode)
    with torch.no_grad():  # masks as training leaves them (at 1 a masked copy is the plain vector)
        bank.coefficients.add_(0.1 * torch.randn(plan.coefficient_params, generator=torch.Generator().manual_seed(2)))
    for ids in (plan.member_slots(0), plan.member_slots(1), [9, 2, 2], [5], [1, 3, 10]):
        sub, full = bank(slots=ids), bank()
        assert len(sub) == len(full) == len(plan.slots)
        for i, (s, f) in enumerate(zip(sub, full)):
            if i in ids:
                assert torch.equal(s, f), (i, plan.slot_layout[i])
            else:
                assert s is None, i
        (sb, sc), (fb, fc) = _loss_grads(bank, sub, ids), _loss_grads(bank, full, ids)
        assert torch.equal(sb, fb) and sb.abs().sum() > 0
        assert (sc is None) == (fc is None)
        if sc is not None:
            assert torch.equal(sc, fc)
    with pytest.raises(IndexError):
        bank(slots=[-1])


def test_subset_chained_wavg_regions_keep_the_full_tilings_values_when_it_wraps():
    """A wrapping chain (one group, low budget): regions of a subset start mid-chain, beyond one period."""
    plan, bank = make(0.1, "repeat", "one")
    (g,) = plan.groups
    wavg = [i for i in g.slots if plan.slot_layout[i].mode == "wavg"]
    assert sum(plan.slot_layout[i].templates * plan.slots[i].numel for i in wavg) > 2 * g.params
    last = wavg[-1]
    assert torch.equal(bank(slots=[last])[last], bank()[last])


def test_subset_generation_only_computes_the_requested_slots():
    """Counted FLOPs of the wavg matmuls (K x S per slot, S padded to whole column chunks of the plan's chunk
    size, `core.generation`; every slot wavg at budget 1.0): only the thin member's, in forward; backward also
    shrinks."""
    from torch.utils.flop_counter import FlopCounterMode

    plan, bank = make(1.0, "repeat", "depth")
    assert all(lay.mode == "wavg" for lay in plan.slot_layout)

    def counted(ids):
        with FlopCounterMode(display=False) as fc:
            weights = bank(slots=ids) if ids is not None else bank()
        forward = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            sum(w.sum() for w in weights if w is not None).backward()
        return forward, fc.get_total_flops()

    def wavg_flops(ids):
        c = bank._layout.chunk
        return sum(2 * plan.slot_layout[i].templates * -(-plan.slots[i].numel // c) * c for i in ids)

    thin = plan.member_slots(1)
    (full_fwd, full_bwd), (sub_fwd, sub_bwd) = counted(None), counted(thin)
    assert full_fwd == wavg_flops(range(len(plan.slots)))
    assert sub_fwd == wavg_flops(thin) < full_fwd
    assert sub_bwd < full_bwd
    assert full_fwd <= 1.05 * sum(2 * plan.slot_layout[i].templates * plan.slots[i].numel for i in range(len(plan.slots)))

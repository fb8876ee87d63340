import math

import pytest
import torch

from core.bank import SuperWeightBank
from core.plan import build_plan, minimum_budget
from tests.init_reference import reference_std


def make_bank(slots, budget, **kw):
    return SuperWeightBank(build_plan(slots, budget, **kw), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("budget", ["min", 0.01, 0.3, 1.0, 2.0])
def test_every_bank_entry_gets_gradient(slots, budget):
    bank = make_bank(slots, minimum_budget(slots) + 1 if budget == "min" else budget)
    torch.manual_seed(1)
    loss = sum((w * torch.randn_like(w)).sum() for w in bank())
    loss.backward()
    assert bank.bank.grad is not None
    assert (bank.bank.grad != 0).all()
    assert (bank.coefficients.grad != 0).all()


def test_thin_slot_is_top_left_crop_of_wide_slot_bit_for_bit(slots):
    bank = make_bank(slots, 0.4)
    raw = bank.raw_weights()
    weights = bank()
    plan = bank.plan
    pairs = 0
    for i, s in enumerate(plan.slots):
        for j, t in enumerate(plan.slots):
            if s.member == 0 and t.member == 1 and plan.slot_coef[i] == plan.slot_coef[j]:
                o, n = t.shape[:2]
                assert torch.equal(raw[j], raw[i][:o, :n])
                # the only difference between the two slot weights is each slot's fixed scalar He gain
                assert torch.equal(weights[j], raw[i][:o, :n] * bank.gains[j])
                assert torch.equal(weights[i], raw[i] * bank.gains[i])
                pairs += 1
    assert pairs == 6


@pytest.mark.parametrize("budget", [0.005, 0.05, 0.5, 1.0, 2.0])
def test_composed_weights_have_the_reference_init_std(slots, budget):
    bank = make_bank(slots, budget)
    for spec, w in zip(bank.plan.slots, bank()):
        if w.numel() >= 1000:
            assert w.std().item() == pytest.approx(reference_std(spec.shape), rel=0.10)


def test_templates_are_normal_at_the_init_scale_of_their_slots_and_coefficients_unit_norm(slots):
    bank = make_bank(slots, 1.0)
    plan = bank.plan
    for b in plan.blocks:
        users = [i for i in range(len(plan.slots)) if any(b.id in row for row in plan.slot_cells(i))]
        rms_init = math.sqrt(sum(reference_std(plan.slots[i].shape) ** 2 for i in users) / len(users))
        theta = bank.theta(b.id)  # (logical order: `core.bank_storage`)
        if b.params >= 2000:
            assert theta.std().item() == pytest.approx(rms_init, rel=0.1)
        norms = bank.block_coefficients(b.id).norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    # so the fixed gains are ~1 and the bank trains at the network's learning rate (template_scales)
    assert bank.gains.min().item() > 0.7 and bank.gains.max().item() < 1.4


def test_one_sgd_step_moves_a_generated_weight_like_an_ordinary_weight():
    """The storage scale of a parameter is its SGD learning rate: a slot generated from its own block moves
    by ~ -lr * grad, as an ordinary weight does (with N(0, 1) templates it moved gain^2 ~ 2/fan_in times less)."""
    from core.plan import SlotSpec

    spec = SlotSpec(0, "conv", "conv3x3", (64, 64, 3, 3))
    bank = make_bank([spec], 2.0)  # high budget: disjoint template windows
    w0 = bank()[0].detach().clone()
    direction = torch.randn(spec.shape, generator=torch.Generator().manual_seed(3))
    (bank()[0] * direction).sum().backward()  # dL/dW = direction
    lr = 0.01
    with torch.no_grad():
        bank.bank -= lr * bank.bank.grad
    moved = bank()[0].detach() - w0
    ratio = (moved * -direction).sum() / (lr * direction.pow(2).sum())
    assert ratio.item() == pytest.approx(1.0, rel=0.15)


@pytest.mark.parametrize("budget", ["min", 0.01, 1.0])
def test_no_two_slots_of_a_member_are_identical(slots, budget):
    bank = make_bank(slots, minimum_budget(slots) + 3 if budget == "min" else budget)
    weights = bank()
    for m in (0, 1):
        ids = bank.plan.member_slots(m)
        for a in ids:
            for b in ids:
                if a < b and weights[a].shape == weights[b].shape:
                    assert not torch.equal(weights[a], weights[b])


def test_tiled_templates_are_cyclic_windows(slots):
    plan = build_plan(slots, 0.05)
    bank = SuperWeightBank(plan)
    b = max(plan.blocks, key=lambda b: b.size)
    assert b.params < b.size  # low budget: windows wrap (NPAS "repeat")
    t = bank.templates(b.id)
    theta = bank.theta(b.id)
    for k, start in enumerate(b.window_starts()):
        idx = (start + torch.arange(b.size)) % b.params
        assert torch.equal(t[k], theta[idx])


def test_same_seed_same_bank(slots):
    a, b = make_bank(slots, 0.3), make_bank(slots, 0.3)
    assert torch.equal(a.bank, b.bank) and torch.equal(a.coefficients, b.coefficients)
    assert torch.equal(a.gains, b.gains)


# -- subset generation (issue 12: each member-parallel worker generates only what it runs) --------------


def _loss_grads(bank, weights, ids, seed=5):
    """Gradients (bank, coefficients) of a random linear loss on the slots `ids` of `weights`."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((weights[i] * torch.randn(weights[i].shape, generator=g)).sum() for i in ids)
    bank.zero_grad(set_to_none=True)
    loss.backward()
    return bank.bank.grad.clone(), bank.coefficients.grad.clone()


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("budget", ["min", 0.01, 0.3, 2.0])
def test_subset_generation_is_the_full_generation_on_the_requested_slots(slots, budget, share):
    bank = make_bank(slots, minimum_budget(slots, share_coefficients=share) + 1 if budget == "min" else budget,
                     share_coefficients=share)
    plan = bank.plan
    for ids in (plan.member_slots(0), plan.member_slots(1), [9, 2, 2], [11], list(range(len(slots)))):
        sub, full = bank(slots=ids), bank()
        assert len(sub) == len(full) == len(plan.slots)
        for i, (s, f) in enumerate(zip(sub, full)):
            if i in ids:
                assert torch.equal(s, f), i
            else:
                assert s is None, i
        sub_grads, full_grads = _loss_grads(bank, sub, ids), _loss_grads(bank, full, ids)
        assert torch.equal(sub_grads[0], full_grads[0]) and torch.equal(sub_grads[1], full_grads[1])
        assert sub_grads[0].abs().sum() > 0 and sub_grads[1].abs().sum() > 0
    raw = bank.raw_weights(slots=[3])
    assert torch.equal(raw[3], bank.raw_weights()[3]) and sum(w is not None for w in raw) == 1
    with pytest.raises(IndexError):
        bank(slots=[len(slots)])


def test_subset_generation_computes_only_the_blocks_its_slots_read(slots):
    """Counted FLOPs: block b costs its matmul alpha_b [R, K_b] @ templates [K_b, size_b], cut into column chunks of
    the plan's chunk size and batched with the other blocks of its (K, R) class (`core.generation`; columns padded
    to whole chunks, rows only above 8 coefficient sets; a `halves` block is [2R, 2] @ [2, size_b / 2]). The thin member's generation computes exactly the blocks
    it reads, none of those only the wide member reads (its extra rows/columns), in forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from core.generation import row_class
    from core.superweight_program import halves

    bank = make_bank(slots, 0.3)
    plan = bank.plan
    thin = plan.member_slots(1)
    read = {bid for i in thin for row in plan.slot_cells(i) for bid in row}
    wide_only = [b for b in plan.blocks if b.id not in read]
    assert len(wide_only) >= 6 and read  # the comparison below means something
    chunk = bank._layout.chunk

    def block_flops(b):
        rows, cols = (2 * len(b.coef_sets), b.size // 2) if halves(b) else (len(b.coef_sets), b.size)
        return 2 * row_class(rows) * b.templates * -(-cols // chunk) * chunk

    def matmul_flops(blocks):
        return sum(map(block_flops, blocks))

    def counted(ids):
        with FlopCounterMode(display=False) as fc:
            weights = bank(slots=ids) if ids is not None else bank()
        forward = fc.get_total_flops()
        loss = sum(w.sum() for w in weights if w is not None)
        with FlopCounterMode(display=False) as fc:
            loss.backward()
        return forward, fc.get_total_flops()

    full_fwd, full_bwd = counted(None)
    sub_fwd, sub_bwd = counted(thin)
    exact = sum(2 * len(b.coef_sets) * b.templates * b.size for b in plan.blocks)
    assert full_fwd == matmul_flops(plan.blocks) <= 1.05 * exact  # padding costs little
    assert sub_fwd == matmul_flops([plan.blocks[b] for b in read])
    assert sub_fwd < full_fwd and sub_bwd < full_bwd
    assert full_bwd == 2 * full_fwd and sub_bwd == 2 * sub_fwd
    assert full_fwd - sub_fwd == matmul_flops(wide_only)
    assert bank._subset(thin)[1] == sorted(read) == bank._program(thin).blocks

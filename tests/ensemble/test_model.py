import math

import pytest
import torch

from ensemble.model import StackedEnsemble, SuperWeightEnsemble, build_ensemble, member_labels

from .conftest import DIGITS, cfg


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def model():
    return build_ensemble(cfg("bank.budget=0.3"), DIGITS)


def test_output_shape_and_trainable_parameters(model):
    x = torch.rand(5, 1, 8, 8)
    assert model(x).shape == (5, 4, 10)
    assert model(x, members=[2, 0]).shape == (5, 2, 10)
    plan = model.plan
    private = sum(p.numel() for m in model.members for p in m.parameters())
    assert count(model) == plan.bank_params + plan.coefficient_params + private
    assert model.bank.bank.numel() == plan.budget


def test_every_member_sends_gradient_to_the_bank(model):
    x = torch.rand(4, 1, 8, 8)
    for i in range(4):
        model.zero_grad(set_to_none=True)
        model.train()
        model(x, members=[i]).sum().backward()
        assert model.bank.bank.grad is not None and model.bank.bank.grad.abs().sum() > 0
        assert model.bank.coefficients.grad.abs().sum() > 0


def test_all_bank_entries_get_gradient_from_the_ensemble(model):
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(0)
    torch.nn.functional.cross_entropy(model(torch.rand(16, 1, 8, 8)).flatten(0, 1), torch.randint(0, 10, (64,))).backward()
    assert (model.bank.bank.grad != 0).all()


def test_materialized_members_are_plain_with_standard_counts_and_same_outputs(model):
    model.eval()
    plain = model.materialize()
    assert isinstance(plain, StackedEnsemble) and not isinstance(plain, SuperWeightEnsemble)
    reference = [build_ensemble(cfg("bank.method=\"full\""), DIGITS).members[i] for i in range(4)]
    for m, r in zip(plain.members, reference):
        assert count(m) == count(r)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)


def test_wide_and_thin_members_share_the_top_left_block(model):
    raw = model.bank.raw_weights()
    plan = model.plan
    # stage-1 conv2 of wrn-16-4 (64x64) and wrn-16-2 (32x32) are corresponding slots
    wide = next(i for i, s in enumerate(plan.slots) if s.member == 0 and s.name == "stages.0.1.conv2")
    thin = next(i for i, s in enumerate(plan.slots) if s.member == 1 and s.name == "stages.0.1.conv2")
    assert plan.slot_coef[wide] == plan.slot_coef[thin]
    assert torch.equal(raw[thin], raw[wide][:32, :32])


@pytest.mark.parametrize("budget", ["0.01", "0.5", "2.0"])
def test_init_has_he_std_at_every_budget(budget):
    m = build_ensemble(cfg(f"bank.budget={budget}"), DIGITS)
    for spec, w in zip(m.plan.slots, m.bank()):
        if w.numel() >= 1000:
            assert w.std().item() == pytest.approx(math.sqrt(2 / spec.fan_in), rel=0.10), spec


def test_no_hard_ties_within_a_member(model):
    weights = model.bank()
    for member in range(4):
        ids = model.plan.member_slots(member)
        for a in ids:
            for b in ids:
                if a < b and weights[a].shape == weights[b].shape:
                    assert not torch.equal(weights[a], weights[b])


def test_full_baseline_count_is_sum_of_members():
    full = build_ensemble(cfg("bank.method=\"full\""), DIGITS)
    assert count(full) == 2_748_602 + 691_386 + 1_198_522 + 303_418
    assert full.materialize() is full


def test_same_seed_same_model_different_seed_different():
    a, b = build_ensemble(cfg("bank.budget=0.1"), DIGITS), build_ensemble(cfg("bank.budget=0.1"), DIGITS)
    c = build_ensemble(cfg("bank.budget=0.1", "train.seed=1"), DIGITS)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.bank.bank, c.bank.bank)


def test_eval_caches_generated_weights_until_the_bank_changes(model):
    model.eval()
    with torch.no_grad():
        first = model._weights()
        assert model._weights() is first
        model.bank.bank.add_(1e-3)
        assert model._weights() is not first


def test_repeated_architectures_get_unique_labels():
    assert member_labels(["wrn-10-1", "wrn-10-1", "wrn-16-2"]) == ["wrn-10-1", "wrn-10-1#2", "wrn-16-2"]

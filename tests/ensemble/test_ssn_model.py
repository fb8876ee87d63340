import json

import pytest
import torch

from core.flops import module_flops
from core.ssn import SSNPlan
from ensemble.methods import build_ensemble
from ensemble.model import SSNEnsemble, StackedEnsemble, SuperWeightEnsemble
from ensemble.ssn_model import (
    build_ssn_ensemble,
    kmeans_groups,
    learned_ssn_groups,
    learned_ssn_plan,
    probe_plan,
)
from ensemble.training import make_optimizer, train_step
from tests.init_reference import reference_std

from .conftest import DIGITS, cfg

MEMBERS = 'ensemble.members=["wrn-10-2","wrn-10-1"]'


def count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def config():
    return cfg(MEMBERS, "bank.budget=0.3", "train.lr=0.05")


@pytest.fixture(scope="module")
def full_members():
    return build_ensemble(cfg(MEMBERS, 'bank.method="full"'), DIGITS).members


@pytest.mark.parametrize("upsample", ["repeat", "mask", "inter"])
def test_materialized_members_are_plain_standard_and_equal(config, full_members, upsample):
    model = build_ssn_ensemble(config, DIGITS, upsample, "depth").eval()
    assert isinstance(model, SuperWeightEnsemble) and isinstance(model.bank.plan, SSNPlan)
    plan = model.plan
    private = sum(p.numel() for m in model.members for p in m.parameters())
    assert model.bank.bank.numel() == plan.budget == round(0.3 * sum(s.numel for s in plan.slots))
    assert count(model) == plan.bank_params + plan.coefficient_params + private
    plain = model.materialize()
    assert isinstance(plain, StackedEnsemble) and not isinstance(plain, SuperWeightEnsemble)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)
    meta = torch.zeros(1, 1, 8, 8)
    for m, ref in zip(plain.members, full_members):
        assert count(m) == count(ref)
        assert module_flops(m, meta) == module_flops(ref, meta)  # upsampling never changes FLOPs


def test_same_seed_same_weights_and_plan_json_rebuilds_it(config):
    a = build_ssn_ensemble(config, DIGITS, "mask", "one")
    plan = SSNPlan.from_json(json.loads(json.dumps(a.plan.to_json())))
    b = build_ssn_ensemble(config, DIGITS, plan=plan)
    for wa, wb in zip(a.bank(), b.bank()):
        assert torch.equal(wa, wb)
    assert a.state_dict().keys() == b.state_dict().keys()


def test_reference_std_of_generated_member_weights(config):
    model = build_ssn_ensemble(config, DIGITS, "inter", "depth", budget=0.05)
    for spec, w in zip(model.plan.slots, model.bank()):
        if w.numel() >= 1000:
            assert w.std().item() == pytest.approx(reference_std(spec.shape), rel=0.10), spec


def test_ssn_ensemble_trains_on_digits(config):
    from ensemble.data import load_data

    data = load_data(config.data, 0, 64, 256)
    model = build_ssn_ensemble(config, data.info, "repeat", "depth")
    optimizer, scheduler = make_optimizer(model, config, 100)
    model.train()
    x, y = next(iter(data.train))
    losses = [float(train_step(model, x, y, optimizer, scheduler)[0]) for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:5]), losses
    assert model.bank.bank.grad is not None and (model.bank.bank.grad != 0).all()


def test_kmeans_groups_are_deterministic_and_cover_every_row():
    torch.manual_seed(0)
    emb = torch.cat([torch.randn(5, 3) + 5, torch.randn(6, 3) - 5, torch.randn(4, 3)])
    a, b = kmeans_groups(emb, 3, seed=1), kmeans_groups(emb, 3, seed=1)
    assert a == b and len(a) == 15 and set(a) == {0, 1, 2} and a[0] == 0
    assert len(set(a[:5])) == len(set(a[5:11])) == len(set(a[11:])) == 1
    assert kmeans_groups(emb[:2], 4) in ([0, 1], [0, 0])  # fewer slots than clusters: still every slot


def test_learned_groups_are_deterministic_and_cover_every_slot(config):
    torch.manual_seed(0)
    batches = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    probe = probe_plan(config, DIGITS, 4)
    assert all(lay.mode == "wavg" and lay.templates == 4 for lay in probe.slot_layout)
    first = learned_ssn_groups(config, DIGITS, batches, "cpu", steps=3, n_groups=3)
    assert len(first) == len(probe.slots) and set(first) <= {0, 1, 2} and len(set(first)) > 1
    plan = learned_ssn_plan(config, DIGITS, batches, "cpu", steps=3, upsample="mask", n_groups=3)  # same seed again
    assert plan.slot_group == first and plan.budget == round(0.3 * sum(s.numel for s in plan.slots))
    model = build_ssn_ensemble(config, DIGITS, "mask", "learned", n_groups=3, groups=first)
    assert isinstance(model, SSNEnsemble) and model.plan == plan


def test_summary_counts_upsampled_slots_and_high_budgets_upsample_none():
    """At budgets where every group holds at least each of its slots, no slot is upsampled: repeat, mask and
    inter then build the same model (the comparison reports them as one), and the summary says so."""
    from ensemble.methods import plan_summary

    def summary(budget, upsample):
        return plan_summary(cfg(MEMBERS, 'bank.method="ssn"', f"bank.budget={budget}", f'bank.upsample="{upsample}"'),
                            DIGITS)

    low = summary(0.02, "repeat")
    modes = [s["mode"] for g in low["groups"] for s in g["slots"]]
    assert low["upsampled_slots"] == sum(m != "wavg" for m in modes) > 0
    high = [summary(1.0, u) for u in ("repeat", "mask", "inter")]
    assert [h["upsampled_slots"] for h in high] == [0, 0, 0]
    assert high[0]["groups"] == high[1]["groups"] == high[2]["groups"]

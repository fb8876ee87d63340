import torch

from ensemble.data import load_data
from ensemble.grouping import shared_pairs, unshare_coefficients
from ensemble.loop import fit
from ensemble.methods import build_ensemble
from ensemble.training import make_optimizer, train_step

from .conftest import cfg

TWINS = ('ensemble.members=["wrn-10-1","wrn-10-1"]', "data.train_per_class=10", "train.batch_size=20",
         "bank.budget=0.3")


def _data(config):
    return load_data(config.data, config.train.seed, config.train.batch_size, config.train.eval_batch_size)


def test_unsharing_splits_twins_which_then_diverge_with_carried_momentum():
    config = cfg(*TWINS, "bank.unshare_threshold=1.01", "bank.unshare_batches=2")  # every pair conflicts
    data = _data(config)
    model = build_ensemble(config, data.info)
    optimizer, scheduler = make_optimizer(model, config, len(data.train))
    x, y = next(iter(data.train))
    for _ in range(2):
        train_step(model, x, y, optimizer, scheduler)
    with torch.no_grad():
        before = model.bank()
    twins = [(a, b) for a in model.slots_of[0] for b in model.slots_of[1] if model.plan.slots[a].name == model.plan.slots[b].name]
    assert all(torch.equal(before[a], before[b]) for a, b in twins)  # shared coefficients, same shapes
    old_plan, old_coef = model.plan, model.bank.coefficients.detach().clone()
    old_momentum = optimizer.state[model.bank.coefficients]["momentum_buffer"].clone()
    ids = [b.id for b in old_plan.blocks]
    bank_state = [model.bank.logical().detach().clone(),
                  model.bank._storage().logical(optimizer.state[model.bank.bank]["momentum_buffer"], ids)]

    pairs = unshare_coefficients(model, optimizer, data.train, config, "cpu", epoch=0)
    assert pairs == shared_pairs(old_plan) == len(twins)
    # values and momentum of every new coefficient set are the old set's at the moment of the split
    from core.grouping import coefficient_transfer

    index = coefficient_transfer(old_plan, model.plan)
    assert torch.equal(model.bank.coefficients.detach(), old_coef[index])
    assert torch.equal(optimizer.state[model.bank.coefficients]["momentum_buffer"], old_momentum[index])
    # the bank is re-stored in the new plan's matmul order (as a new bank of it would be), its momentum moved
    # alike: both the same numbers in logical order
    from core.bank import SuperWeightBank

    assert torch.equal(model.bank.storage, SuperWeightBank(model.plan).storage)
    assert torch.equal(model.bank.logical(), bank_state[0])
    assert torch.equal(model.bank._storage().logical(optimizer.state[model.bank.bank]["momentum_buffer"], ids), bank_state[1])
    with torch.no_grad():
        for w, v in zip(model.bank(), before):  # the split itself changes nothing (up to matmul rounding)
            torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-7)
    for _ in range(3):
        train_step(model, x, y, optimizer, scheduler)
    with torch.no_grad():
        after = model.bank()
    assert all(not torch.equal(after[a], after[b]) for a, b in twins)


def test_same_seed_same_groups_and_exact_budget():
    config = cfg(*TWINS, 'ensemble.members=["wrn-10-2","wrn-10-1"]', "bank.grouping=gradient",
                 "grouping.warmup_epochs=1", "grouping.batches=2")
    data = _data(config)
    a = fit(config, None, progress=False, log=lambda s: None, data=data).model.plan
    b = fit(config, None, progress=False, log=lambda s: None, data=data).model.plan
    depth = build_ensemble(config, data.info).plan
    assert a.to_json() == b.to_json()
    assert len(a.groups) > len(depth.groups)  # the learned groups, not the depth bins
    assert a.bank_params == a.budget == depth.budget


def test_learned_groups_and_sharing_are_in_plan_json(tmp_path):
    config = cfg(*TWINS, "train.epochs=2", "bank.grouping=gradient", "grouping.warmup_epochs=1",
                 "grouping.batches=2", "bank.unshare_epoch=1", "bank.unshare_threshold=1.01", "bank.unshare_batches=1")
    result = fit(config, tmp_path, progress=False, log=lambda s: None)
    # epoch 1 is the warm-up, epoch 2 the first (re-initialised) training epoch, after which unsharing runs
    assert [h["phase"] for h in result.history] == ["warm-up", "train", "train"]
    assert result.history[0]["groups"] == len(result.model.plan.groups)
    assert result.history[1]["unshared_pairs"] > 0
    import json

    saved = json.loads((tmp_path / "plan.json").read_text())["bank"]
    assert [s["group"] for s in saved["slots"]] == result.model.plan.slot_group
    assert [s["coef"] for s in saved["slots"]] == result.model.plan.slot_coef
    from ensemble.checkpoint import load_checkpoint

    _, _, model, _ = load_checkpoint(tmp_path)
    assert model.plan.to_json() == result.model.plan.to_json()


def test_unsharing_restores_the_bank_in_the_new_plans_matmul_order(tmp_path):
    """The default members at 0.5 (most of the bank stored as matmul operands): after the split the bank is in
    the unshared plan's order, as a new bank of that plan would be (more classes read in place than the shared
    order left), and saved and loaded in it."""
    from core.bank import SuperWeightBank
    from ensemble.checkpoint import load_checkpoint

    config = cfg("data.train_per_class=10", "train.epochs=2", "bank.unshare_epoch=1", "bank.unshare_threshold=1.01",
                 "bank.unshare_batches=1")
    result = fit(config, tmp_path, progress=False, log=lambda s: None)
    bank = result.model.bank
    assert result.history[0]["unshared_pairs"] > 0
    shared = build_ensemble(config, _data(config).info).bank.storage
    assert torch.equal(bank.storage, SuperWeightBank(result.model.plan).storage) and not torch.equal(bank.storage, shared)
    views = sum(v is not None for v in bank._program(None).matmuls.views)
    assert views >= 4, views
    _, _, model, _ = load_checkpoint(tmp_path)
    assert torch.equal(model.bank.storage, bank.storage) and torch.equal(model.bank.bank, bank.bank)

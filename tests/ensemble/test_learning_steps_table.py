"""The bank-method table answers when each learning step runs (`ensemble.loop` asks only it)."""

from ensemble.config import load_config
from ensemble.methods import method_of


def steps_of(*overrides):
    config = load_config(None, list(overrides))
    return config, method_of(config).steps


def test_gradient_grouping_regroups_after_the_warm_up_only():
    config, steps = steps_of('bank.grouping="gradient"', "grouping.warmup_epochs=3")
    assert steps.warmup_epochs(config) == 3
    assert [e for e in range(1, 20) if steps.regroups_after(config, e)] == [3]
    config, steps = steps_of('bank.grouping="depth"')
    assert steps.warmup_epochs(config) == 0 and not any(steps.regroups_after(config, e) for e in range(1, 20))


def test_unsharing_counts_its_epoch_after_the_warm_up():
    config, steps = steps_of('bank.grouping="gradient"', "grouping.warmup_epochs=2", "bank.unshare_epoch=4")
    assert [e for e in range(1, 20) if steps.unshares_after(config, e)] == [6]
    config, steps = steps_of("bank.unshare_epoch=4")
    assert [e for e in range(1, 20) if steps.unshares_after(config, e)] == [4]
    config, steps = steps_of("bank.unshare_epoch=0")
    assert not any(steps.unshares_after(config, e) for e in range(1, 20))


def test_only_learned_ssn_groups_pretrain_and_full_learns_nothing():
    config, steps = steps_of('bank.method="ssn"', 'bank.ssn_groups="learned"')
    assert steps.pretrains(config) and steps.warmup_epochs(config) == 0
    config, steps = steps_of('bank.method="ssn"', 'bank.ssn_groups="depth"')
    assert not steps.pretrains(config)
    config, steps = steps_of('bank.method="full"')
    assert (steps.warmup_epochs(config), steps.unshare_epoch(config), steps.pretrains(config)) == (0, 0, False)
    assert not method_of(config).has_bank

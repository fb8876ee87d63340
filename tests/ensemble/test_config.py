import pytest

from core.errors import SuperweightsError
from ensemble.config import Config, load_config, parse_override


def test_defaults_are_the_digits_run():
    c = Config()
    assert c.data.name == "digits" and c.bank.budget == 0.5 and len(c.ensemble.members) == 4


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[bank]\nbudget = 1000\n[ensemble]\nmembers = ["wrn-10-1"]\n')
    c = load_config(f, ["bank.budget=0.25", 'ensemble.members=["wrn-28-7","wrn-28-4"]', "data.name=cifar10"])
    assert c.bank.budget == 0.25 and c.ensemble.members == ("wrn-28-7", "wrn-28-4") and c.data.name == "cifar10"
    assert load_config(f).bank.budget == 1000 and isinstance(load_config(f).bank.budget, int)


def test_int_is_accepted_for_float_fields():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("bank.nope=1", "unknown config key bank.nope; valid keys: data.name"),
        ("nope.key=1", "unknown config section [nope]; valid keys"),
        ("bank.budget", "malformed --set 'bank.budget'"),
        ("budget=3", "malformed --set 'budget=3'"),
        ("bank.budget=[1,", "malformed --set"),
        ("bank.budget=true", "bank.budget must be an integer"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("bank.method=ssm", "bank.method must be one of superweights, ssn, full"),
        ("ensemble.members=[]", "ensemble.members is empty"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(SuperweightsError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(SuperweightsError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[bank\n")
    with pytest.raises(SuperweightsError, match="not valid TOML"):
        load_config(bad)


def test_bare_words_are_strings():
    assert parse_override("data.root=/tmp/x") == ("data", "root", "/tmp/x")
    assert parse_override("bank.budget=0.5") == ("bank", "budget", 0.5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-0.1", "train.lr must be > 0, got -0.1"),
        ("train.lr=0", "train.lr must be > 0, got 0.0"),
        ("train.lr=nan", "train.lr must be > 0, got nan"),
        ("train.lr=inf", "train.lr must be > 0, got inf"),
        ("train.momentum=1", "train.momentum must be in [0.0, 1.0), got 1.0"),
        ("train.momentum=-0.5", "train.momentum must be in [0.0, 1.0), got -0.5"),
        ("train.weight_decay=-1e-4", "train.weight_decay must be >= 0, got -0.0001"),
        ("train.eval_batch_size=-1", "train.eval_batch_size must be >= 0, got -1"),
        ("train.seed=-1", "train.seed must be in [0, 9223372036854775807], got -1"),
        ("data.val_fraction=0", "data.val_fraction must be in (0, 1), got 0.0"),
        ("data.val_fraction=1", "data.val_fraction must be in (0, 1), got 1.0"),
        ("data.test_fraction=1.5", "data.test_fraction must be in (0, 1), got 1.5"),
        ("data.image_size=-1", "data.image_size must be >= 0, got -1"),
        ("data.train_per_class=-3", "data.train_per_class must be >= 0, got -3"),
        ("bank.budget=0", "bank.budget must be >= 1, got 0"),
        ("bank.budget=-0.5", "bank.budget must be > 0, got -0.5"),
        ("bank.budget=nan", "bank.budget must be > 0, got nan"),
        ("bank.depth_bins=0", "bank.depth_bins must be >= 1, got 0"),
        ("bank.max_templates=1", "bank.max_templates must be >= 2, got 1"),
        ("bank.unshare_threshold=1.5", "bank.unshare_threshold must be in [-1.0, 1.01], got 1.5"),
        ("bank.unshare_threshold=-2", "bank.unshare_threshold must be in [-1.0, 1.01], got -2.0"),
        ("bank.groups=0", "bank.groups must be >= 1, got 0"),
        ("grouping.threshold=1.5", "grouping.threshold must be in [-1.0, 1.0], got 1.5"),
        ("grouping.threshold_step=0", "grouping.threshold_step must be > 0, got 0.0"),
        ("grouping.tries=0", "grouping.tries must be >= 1, got 0"),
        ("debug.crash_at_epoch=-1", "debug.crash_at_epoch must be >= 0, got -1"),
        ("ensemble.exit_weights=[1, -1]", "ensemble.exit_weights must be >= 0, got [1.0, -1.0]"),
        ("ensemble.exit_weights=[nan]", "ensemble.exit_weights must be >= 0, got [nan]"),
        ("ensemble.exit_weights=[0, 0]", "ensemble.exit_weights must not all be 0"),
        ("anytime.order=[0, -1]", "anytime.order entries are member indices >= 0, got -1 at position 1"),
        ("anytime.order=[0, 4]", "anytime.order: member index 4 does not exist (members 0..3)"),
    ],
)
def test_numeric_keys_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(SuperweightsError) as e:
        load_config(None, [override])
    assert str(e.value) == message or str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["bank.unshare_threshold=1.01"],  # every shared pair conflicts (tests rely on it)
        ["bank.unshare_threshold=-1"],
        ["grouping.threshold=-1", "grouping.threshold_step=0.5"],
        ["train.momentum=0", "train.weight_decay=0", "train.lr=1e6"],  # huge lr: caught when it diverges
        ['bank.method="ssn"', "bank.max_templates=1"],  # SSN wavg may use a single template
        ["data.val_fraction=0.5", "data.test_fraction=0.99", "data.train_per_class=0"],
        ["bank.budget=1", "bank.budget=2.0"],
        ["ensemble.exit_weights=[0, 1]", "anytime.order=[3, 0]"],
    ],
)
def test_values_at_the_edges_of_their_ranges_are_valid(overrides):
    load_config(None, overrides)


# -- the memory a budget needs (ensemble.planning.check_memory) ---------------------------------------------


def _digits_summary(*overrides):
    from ensemble.methods import plan_summary

    from .conftest import DIGITS, cfg

    return plan_summary(cfg('ensemble.members=["wrn-10-1"]', *overrides), DIGITS)


def test_memory_estimate_counts_parameters_gradients_momentum_and_generated_weights():
    from ensemble.planning import training_memory_bytes

    s = _digits_summary()
    trainable = s["bank_params"] + s["coefficient_params"] + s["private_params"]
    assert training_memory_bytes(s) == 4 * (3 * trainable + 2 * s["slot_weights"])
    assert training_memory_bytes(s, momentum=False) == 4 * (2 * trainable + 2 * s["slot_weights"])
    full = _digits_summary('bank.method="full"')
    assert training_memory_bytes(full) == 4 * 3 * full["full_ensemble_params"]  # no bank, nothing generated


def test_a_budget_that_cannot_fit_memory_is_refused_with_the_estimate(monkeypatch):
    from ensemble import methods, planning

    from .conftest import DIGITS, cfg

    s = _digits_summary()
    need = planning.check_memory(s, available=10**12)  # fits: returns the estimate
    with pytest.raises(SuperweightsError) as e:
        planning.check_memory(s, available=need - 1)
    assert f"needs at least {need / 1e9:,.1f} GB to train" in str(e.value) and "\n" not in str(e.value)
    assert "lower bank.budget" in str(e.value)
    # before training (what the driver and compare children call) the check runs on its own
    monkeypatch.setattr(planning, "available_memory_bytes", lambda: 64 * 10**9)
    huge = cfg('ensemble.members=["wrn-10-1"]', "bank.budget=1000000000000")
    with pytest.raises(SuperweightsError, match=r"a bank of 1,000,000,000,000 parameters \(bank.budget\) needs at "
                                                r"least 12,00\d.\d GB to train .* this machine has 64.0 GB available"):
        methods.plan_summary(huge, DIGITS, before_training=True)
    assert methods.plan_summary(huge, DIGITS)["budget"] == 10**12  # a plain summary only describes
    learned = cfg('ensemble.members=["wrn-10-1"]', 'bank.method="ssn"', 'bank.ssn_groups="learned"',
                  "bank.budget=1000000000000")
    with pytest.raises(SuperweightsError, match="needs at least"):
        methods.plan_summary(learned, DIGITS, before_training=True)
    # the bank alone is checked before any layout: an SSN plan of 1e15 parameters is never laid out
    absurd = cfg('ensemble.members=["wrn-10-1"]', 'bank.method="ssn"', "bank.budget=1000000000000000")
    with pytest.raises(SuperweightsError, match="a bank of 1,000,000,000,000,000 parameters"):
        methods.plan_summary(absurd, DIGITS, memory_check=True)
    monkeypatch.setattr(planning, "available_memory_bytes", lambda: None)  # unknown: no refusal
    assert methods.plan_summary(huge, DIGITS, before_training=True)["budget"] == 10**12


def test_available_memory_is_read_from_this_machine():
    from ensemble.planning import available_memory_bytes

    available = available_memory_bytes()
    assert available is None or available > 0

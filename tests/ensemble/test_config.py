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

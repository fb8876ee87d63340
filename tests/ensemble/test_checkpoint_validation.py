"""A checkpoint whose plan.json / config.json / weights disagree is refused in one line (issue 13).

Checked at `load_plan` (what `plan --from`, `serve`, `evaluate` and resume read) and at `load_checkpoint`
(the weights); learned layouts (gradient regrouping, coefficient unsharing, learned SSN groups) differ from
the config's depth-bin plan on purpose and must still load.
"""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from core.errors import SuperweightsError
from ensemble.checkpoint import load_checkpoint, load_plan
from ensemble.loop import fit
from ensemble.methods import make_plan
from ensemble.train_state import read_train_state
from ray_jobs import cli

from .conftest import cfg

TINY = ("data.train_per_class=5", 'ensemble.members=["wrn-10-1"]', "train.epochs=1")
TWO = ("data.train_per_class=5", 'ensemble.members=["wrn-10-1","wrn-10-2"]', "train.epochs=1")
TWINS = ("data.train_per_class=5", 'ensemble.members=["wrn-10-1","wrn-10-1"]', "train.epochs=1")  # labels wrn-10-1, wrn-10-1#2


def _train(tmp_path_factory, name, *overrides):
    out = tmp_path_factory.mktemp(name)
    fit(cfg(*overrides), out, progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _train(tmp_path_factory, "tiny", *TINY)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The default members: at the default budget most of their bank is stored as its matmuls' operands. Row-major,
    as every bank written before the storage order was (legacy files below have no bank.channels_last)."""
    return _train(tmp_path_factory, "stored", "data.train_per_class=5", "train.epochs=1", "train.channels_last=false")


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """Gradient-regrouped and coefficient-unshared (both steps of the SuperWeight method in one run)."""
    return _train(tmp_path_factory, "learned", *TWO, "bank.grouping=gradient", "grouping.warmup_epochs=1",
                  "grouping.batches=2", "bank.unshare_epoch=1", "bank.unshare_threshold=1.01", "bank.unshare_batches=1")


@pytest.fixture(scope="module")
def ssn_learned(tmp_path_factory):
    return _train(tmp_path_factory, "ssn", *TWINS, 'bank.method="ssn"', 'bank.ssn_groups="learned"',
                  "bank.pretrain_steps=3", 'bank.upsample="mask"', "bank.budget=0.2")


def tampered(src, dst, plan=None, config=None, weights=None):
    """A copy of checkpoint `src` with plan.json / config.json / weights edited in place by the callables."""
    shutil.copytree(src, dst)
    for name, edit in (("plan.json", plan), ("config.json", config)):
        if edit:
            data = json.loads((dst / name).read_text())
            edit(data)
            (dst / name).write_text(json.dumps(data))
    if weights:
        state = load_file(str(dst / "weights.safetensors"))
        weights(state)
        save_file(state, str(dst / "weights.safetensors"))
    return dst


def budget_plus_100(p):
    p["bank"]["budget"] += 100


def one_line_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("superweights: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", [["evaluate"], ["plan", "--from"], ["serve", "--port", "0"]])
def test_edited_plan_budget_is_one_line_exit_2(tiny, tmp_path, capsys, command):
    bad = tampered(tiny, tmp_path / "edited", plan=budget_plus_100)
    budget = json.loads((tiny / "plan.json").read_text())["bank"]["budget"]
    argv = [command[0], *command[1:], str(bad)] if command[0] != "serve" else ["serve", str(bad), *command[1:]]
    line = one_line_error(capsys, argv)
    assert f"{bad / 'plan.json'} does not match config.json: budget {budget + 100:,}" in line
    assert f"gives {budget:,} parameters" in line


def test_edited_plan_is_refused_at_resume(tiny, tmp_path):
    bad = tampered(tiny, tmp_path / "edited", plan=budget_plus_100)
    with pytest.raises(SuperweightsError, match="does not match config.json: budget"):
        read_train_state(bad)


def test_plan_from_a_good_checkpoint_still_works(tiny, capsys):
    assert cli.main(["plan", "--from", str(tiny), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["members"][0]["name"] == "wrn-10-1"


def _move_params(p):  # same budget, another split between two blocks
    blocks = [b for g in p["bank"]["groups"] for b in g["blocks"]]
    blocks[0]["params"] += 5
    blocks[1]["params"] -= 5


@pytest.mark.parametrize(
    "plan, config, message",
    [
        (_move_params, None, "bank.groups[0].blocks[0].params is"),
        (lambda p: p["bank"]["slots"][1]["shape"].__setitem__(0, 99), None, "slot 1 is stages.0.0.conv1 conv3x3 [99,"),
        (lambda p: p["bank"].__setitem__("bank_params", p["bank"]["bank_params"] + 1), None, "bank.bank_params is"),
        (lambda p: p["bank"].__setitem__("budget", "many"), None, "budget 'many' is not a parameter count"),
        (lambda p: p["bank"].__setitem__("max_templates", 3), None, "max_templates 3 but bank.max_templates = 4"),
        (lambda p: p["bank"]["slots"][0].__setitem__("coef", 7), None, "bank.slots[0].coef is 7, expected 0"),
        (lambda p: p["dataset"].__setitem__("num_classes", 11), None, "dataset num_classes 11 but digits has 10"),
        (lambda p: p.__setitem__("members", ["wrn-10-2"]), None, "members ['wrn-10-2'] but the config has"),
        (lambda p: p["bank"].pop("groups"), None, "plan.json is malformed (missing 'groups')"),
        (None, lambda c: c["train"].__setitem__("lr", -1), "config.json: train.lr must be > 0, got -1.0"),
    ],
)
def test_disagreeing_plan_and_config_are_one_line_errors(tiny, tmp_path, plan, config, message):
    bad = tampered(tiny, tmp_path / "bad", plan=plan, config=config)
    for load in (load_plan, load_checkpoint):
        with pytest.raises(SuperweightsError) as e:
            load(bad)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_budget_edited_in_plan_and_config_together_is_refused(tiny, tmp_path):
    budget = json.loads((tiny / "plan.json").read_text())["bank"]["budget"] + 100

    def plan(p):
        p["bank"]["budget"] = p["bank"]["bank_params"] = budget

    bad = tampered(tiny, tmp_path / "bad", plan=plan, config=lambda c: c["bank"].__setitem__("budget", budget))
    with pytest.raises(SuperweightsError, match=r"bank\.groups\[\d+\]\.blocks\[\d+\]\.params is \d+, expected \d+ when laid "
                                                r"out from config.json$"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.__setitem__("bank.bank", s["bank.bank"][:-1].clone()), "bank.bank has shape ["),
        (lambda s: s.pop("bank.coefficients"), "missing tensor bank.coefficients"),
        (lambda s: s.__setitem__("extra", s["bank.bank"][:3].clone()), "unexpected tensor extra"),
    ],
)
def test_weights_that_disagree_are_one_line_errors(tiny, tmp_path, capsys, edit, message):
    bad = tampered(tiny, tmp_path / "bad", weights=edit)
    with pytest.raises(SuperweightsError) as e:
        load_checkpoint(bad)
    assert f"{bad / 'weights.safetensors'} does not match plan.json/config.json: {message}" in str(e.value)
    assert "\n" not in str(e.value)
    assert message in one_line_error(capsys, ["evaluate", str(bad)])


def test_learned_layouts_load_and_are_still_checked(learned, ssn_learned, tmp_path):
    for folder in (learned, ssn_learned):
        config, info, plan = load_plan(folder)
        load_checkpoint(folder)
    config, info, plan = load_plan(learned)
    depth = make_plan(config, info)
    assert len(plan.groups) != len(depth.groups) or plan.num_coef_sets != depth.num_coef_sets  # truly learned

    def regroup(p):  # a slot moved to another group of its kind: the layout no longer adds up
        slots = p["bank"]["slots"]
        other = next(s["group"] for s in slots if s["kind"] == slots[1]["kind"] and s["group"] != slots[1]["group"])
        slots[1]["group"] = other

    for i, (src, edit) in enumerate(((learned, regroup), (learned, _move_params), (ssn_learned, budget_plus_100),
                                     (ssn_learned, lambda p: p["bank"]["groups"][0].__setitem__("offset", 1)))):
        bad = tampered(src, tmp_path / f"bad{i}", plan=edit)
        with pytest.raises(SuperweightsError, match="plan.json does not match config.json: ") as e:
            load_checkpoint(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["bank.storage"].__setitem__(-1, 7), "bank.storage names chunks of 7 entries, the plan's are 512"),
        (lambda s: s["bank.storage"].__setitem__(s["bank.storage"][:-1].argmax(), 99),
         "bank.storage does not rank the blocks 0, 1, 2, ...: not a storage order"),
        (lambda s: s["bank.storage"].__setitem__(0, s["bank.storage"][:-1].max() + 1),  # the stem: 144 entries
         "bank.storage stores block 0 as an operand, but its templates are not disjoint slices of whole chunks"),
        (lambda s: s["bank.channels_last"].fill_(2), "bank.channels_last must be 0 or 1, got 2"),
    ],
)
def test_a_tampered_storage_order_is_a_one_line_error(stored, tmp_path, capsys, edit, message):
    bad = tampered(stored, tmp_path / "bad", weights=edit)
    with pytest.raises(SuperweightsError) as e:
        load_checkpoint(bad)
    assert f"{bad / 'weights.safetensors'} does not match plan.json/config.json: " in str(e.value)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert message in one_line_error(capsys, ["evaluate", str(bad)])


def test_weights_saved_before_the_storage_order_load_in_logical_order(stored, tmp_path):
    """Weights written before the bank had a storage order (`core.bank_storage`) and channels_last banks: the bank
    in logical order, no bank.storage, no bank.channels_last. They load as such, and generate the same weights."""
    import torch

    _, _, model, _ = load_checkpoint(stored)
    assert (model.bank.storage[:-1] >= 0).any()  # this bank is stored as its matmuls' operands
    logical = model.bank.logical().detach().clone()

    def legacy(state):
        state["bank.bank"] = logical
        del state["bank.storage"], state["bank.channels_last"]

    _, _, old, _ = load_checkpoint(tampered(stored, tmp_path / "legacy", weights=legacy))
    assert (old.bank.storage[:-1] == -1).all() and int(old.bank.channels_last) == 0
    with torch.no_grad():
        for a, b in zip(old.bank(), model.bank()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

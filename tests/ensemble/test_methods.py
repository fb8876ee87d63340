"""The bank-method table (`ensemble.methods`), exit weights in the constructor, the staged-member base class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ensemble.members  # noqa: F401  (registers every architecture)
from core.errors import SuperweightsError
from core.plan import Plan
from core.ssn import SSNPlan
from ensemble.config import METHODS as CONFIG_METHODS
from ensemble.exits import ExitMember, as_steps, wrap_with_exits
from ensemble.members.staged import StagedMember
from ensemble.methods import METHODS, build_ensemble, make_plan, method_of, plan_summary
from ensemble.model import SSNEnsemble, StackedEnsemble, SuperWeightEnsemble
from ensemble.planning import example_input
from ensemble.registry import create_model
from ensemble.training import model_loss

from .conftest import DIGITS, cfg

MEMBERS = 'ensemble.members=["wrn-10-2","mlp-32-2"]'
KINDS = {"superweights": (SuperWeightEnsemble, Plan), "ssn": (SSNEnsemble, SSNPlan), "full": (StackedEnsemble, type(None))}


def test_table_has_every_method_the_config_accepts():
    assert tuple(METHODS) == CONFIG_METHODS
    for name, method in METHODS.items():
        assert method.name == name
        assert callable(method.plan) and callable(method.build) and callable(method.summary)


@pytest.mark.parametrize("method", CONFIG_METHODS)
def test_one_way_in_per_question(method):
    config = cfg(MEMBERS, f"bank.method={method}", "bank.budget=0.3")
    model_type, plan_type = KINDS[method]
    assert method_of(config).plan_type is (None if plan_type is type(None) else plan_type)
    plan = make_plan(config, DIGITS)
    assert type(plan) is plan_type
    model = build_ensemble(config, DIGITS)
    assert type(model) is model_type
    summary = plan_summary(config, DIGITS)
    assert summary["method"] == method
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    # same seed, same weights: the plan given or laid out gives the same model
    again = build_ensemble(config, DIGITS, plan)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("method", CONFIG_METHODS)
def test_exit_weights_come_through_the_constructor(method):
    config = cfg(MEMBERS, f"bank.method={method}", "bank.budget=0.3", "ensemble.exits=[0]",
                 "ensemble.exit_weights=[0, 1]")
    model = build_ensemble(config, DIGITS)
    assert model.exit_weights == (0.0, 1.0)
    assert "exit_weights" in vars(model)  # set by StackedEnsemble.__init__, not from outside
    assert model.materialize().exit_weights == (0.0, 1.0)
    # the loss weighs exits by them: weights (0, 1) leave the last exits' cross-entropy alone
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss, logits = model_loss(model, x, y)
    ce = sum(F.cross_entropy(logits[:, m], y) for m in range(logits.shape[1]))
    assert torch.allclose(loss, ce, atol=1e-5)


def test_plain_ensemble_defaults_to_no_exit_weights():
    assert StackedEnsemble([nn.Linear(2, 2)], ["a"], (0.0,), (1.0,)).exit_weights == ()


@pytest.mark.parametrize("name", ["wrn-10-2", "resnet-18-8", "mobilenetv2-25", "mlp-32-2"])
def test_every_family_is_a_staged_member(name):
    torch.manual_seed(0)
    channels, size = (3, 32)
    member = create_model(name, channels, 10).eval()
    assert isinstance(member, StagedMember)
    assert as_steps(member) is member and member.num_exits == 1
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        h, logits = member.advance(x, 0)
        assert torch.equal(logits, member(x))
        assert torch.equal(member.last(x), member(x))
        assert h.shape[1] == member.stage_channels[-1]
    with pytest.raises(IndexError):
        member.advance(x, 1)


def test_exit_member_steps_add_up_to_its_forward():
    torch.manual_seed(0)
    member = create_model("wrn-10-2", 1, 10)
    wrapped = wrap_with_exits(member, "wrn-10-2", "all", example_input(DIGITS), 10).eval()
    assert isinstance(wrapped, ExitMember) and wrapped.num_exits == 3
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        outs, h = [], x
        for k in range(wrapped.num_exits):
            h, logits = wrapped.advance(h, k)
            outs.append(logits)
        assert torch.equal(torch.stack(outs, dim=1), wrapped(x))
        assert torch.equal(wrapped.last(x), member(x))


def test_exits_need_a_staged_member():
    with pytest.raises(SuperweightsError, match="not a StagedMember"):
        wrap_with_exits(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "plain", "all", example_input(DIGITS), 10)

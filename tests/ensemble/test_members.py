"""Generic tests over every registered member (timm style), plus one mixed ensemble trained from one bank.

Reference parameter counts are independent of our modules: torchvision's own ResNet / MobileNetV2 with
the CIFAR stem adaptation (3x3 stride-1 first conv, no max-pool), and closed-form counts for WRN
(anchored to the papers' WRN-28-10 = 36,479,194) and the MLP. Big models are counted on the meta device.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ensemble.members  # noqa: F401  (registers every architecture)
from core.errors import SuperweightsError
from core.slots import SLOT_TYPES, trace_slots
from ensemble.config import load_config
from ensemble.data import dataset_info
from ensemble.members.mlp import GRID
from ensemble.methods import build_ensemble, plan_summary
from ensemble.model import StackedEnsemble, SuperWeightEnsemble
from ensemble.registry import create_model, list_models

MODELS = list_models()
DIGITS = dataset_info(load_config(None).data)  # 1x8x8, 10 classes
INPUTS = {"digits": (1, 8, 10), "cifar": (3, 32, 100)}  # (channels, size, classes)
PARTNER = "wrn-10-2"
BIG = 3_000_000  # members with more parameters run their real-number tests only in the slow suite
BUDGET = 0.2


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, in_channels, num_classes)


# Real-number tests: every model, the big ones (ResNet-18/34, WRN-16-8, WRN-28-x, WRN-40-4) marked slow.
PARAMS = [
    pytest.param(n, marks=pytest.mark.slow) if count(meta_model(n, 1, 10)) > BIG else n for n in MODELS
]


# -- reference architectures / counts (not built from our modules) ------------------------------


def tv_resnet(depth: int, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision resnet18/34 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool."""
    net = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


def tv_mobilenet_v2(width_mult: float, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision mobilenet_v2 with the CIFAR stem: stride-1 first conv on `in_channels`."""
    net = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    first = net.features[0][0]
    net.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1, 1, bias=False)
    return net


def wrn_params(depth: int, widen: int, cin: int, classes: int) -> int:
    """Pre-activation WRN: BN (2 per channel) before every conv, 1x1 shortcut only where the shape changes."""
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    total = 9 * cin * 16
    for s in range(3):
        for i in range(n):
            a, b = (widths[s] if i == 0 else widths[s + 1]), widths[s + 1]
            total += 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if (a != b or (s > 0 and i == 0)) else 0)
    return total + 2 * widths[3] + widths[3] * classes + classes


def resnet_params(depth: int, width: int, cin: int, classes: int) -> int:
    """BasicBlock ResNet with a 3x3 stem: conv3x3-BN-conv3x3-BN blocks, 1x1 conv + BN shortcut on change."""
    layers = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
    total = 9 * cin * width + 2 * width
    a = width
    for s, n in enumerate(layers):
        b = width * 2**s
        for i in range(n):
            cin_block = a if i == 0 else b
            total += 9 * cin_block * b + 2 * b + 9 * b * b + 2 * b
            if i == 0 and (s > 0 or a != b):
                total += cin_block * b + 2 * b
        a = b
    return total + a * classes + classes


def mlp_params(width: int, depth: int, cin: int, classes: int) -> int:
    dims = [cin * GRID * GRID] + [width] * depth + [classes]
    return sum(i * o + o for i, o in zip(dims[:-1], dims[1:]))


def reference_params(name: str, cin: int, classes: int) -> int:
    family, *fields = name.split("-")
    f = [int(v) for v in fields]
    if family == "wrn":
        return wrn_params(f[0], f[1], cin, classes)
    if family == "resnet":
        depth, width = f[0], (f[1] if len(f) > 1 else 64)
        if width == 64:
            with torch.device("meta"):
                return count(tv_resnet(depth, cin, classes))
        return resnet_params(depth, width, cin, classes)
    if family == "mobilenetv2":
        with torch.device("meta"):
            return count(tv_mobilenet_v2(f[0] / 100 if f else 1.0, cin, classes))
    if family == "mlp":
        return mlp_params(f[0], f[1], cin, classes)
    raise AssertionError(f"no reference parameter count for {name!r}: add one to this test")


# -- plain members -------------------------------------------------------------------------------


def test_new_families_are_registered():
    for name in ("resnet-18", "resnet-34", "resnet-18-16", "mobilenetv2", "mobilenetv2-50", "mlp-256-2"):
        assert name in MODELS
    for name in ("resnet-34-32", "mobilenetv2-75", "mlp-64-1"):  # any valid family combination works
        assert count(meta_model(name, 3, 10)) == reference_params(name, 3, 10)


@pytest.mark.parametrize("bad", ["resnet-20", "resnet-50", "resnet-18-0", "mobilenetv2-0", "mlp-0-2", "mlp-64-0", "wrn-11-2"])
def test_invalid_family_fields_raise_one_line_error(bad):
    with pytest.raises(SuperweightsError) as err:
        create_model(bad, 3, 10)
    msg = str(err.value)
    assert "\n" not in msg and any(w in msg for w in ("valid depths", "must be"))


def test_reference_counts_are_anchored():
    # The papers' figure, and the closed form against torchvision itself where torchvision has the model.
    assert wrn_params(28, 10, 3, 10) == 36_479_194
    for depth in (18, 34):
        with torch.device("meta"):
            assert resnet_params(depth, 64, 3, 10) == count(tv_resnet(depth, 3, 10))
    with torch.device("meta"):
        assert count(tv_resnet(18, 3, 10)) == 11_173_962  # the usual CIFAR ResNet-18 figure


@pytest.mark.parametrize("data", sorted(INPUTS))
@pytest.mark.parametrize("name", MODELS)
def test_standard_parameter_count(name, data):
    cin, _, classes = INPUTS[data]
    assert count(meta_model(name, cin, classes)) == reference_params(name, cin, classes)


@pytest.mark.parametrize(("name", "depth"), [("resnet-18", 18), ("resnet-34", 34)])
def test_resnet_has_torchvision_parameter_shapes(name, depth):
    """Same parameters as adapted torchvision, in the same order (stem, layer1-4, fc)."""
    with torch.device("meta"):
        ours, ref = create_model(name, 3, 10), tv_resnet(depth, 3, 10)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]


@pytest.mark.parametrize(("name", "width"), [("mobilenetv2", 1.0), ("mobilenetv2-50", 0.5)])
def test_mobilenet_has_torchvision_parameter_shapes(name, width):
    with torch.device("meta"):
        ours, ref = create_model(name, 3, 10), tv_mobilenet_v2(width, 3, 10)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]


def test_depthwise_convs_are_slots():
    with torch.device("meta"):
        net = create_model("mobilenetv2", 1, 10)
        slots = trace_slots(net, torch.zeros(2, 1, 8, 8))
    dw = [shape for _, kind, shape in slots if kind == "dwconv3x3"]
    assert len(dw) == 17 and all(s[1:] == (1, 3, 3) for s in dw)


def test_mlp_is_linear_only():
    net = create_model("mlp-256-2", 1, 10)
    assert {type(m) for m in net.modules() if isinstance(m, SLOT_TYPES)} == {nn.Linear}


@pytest.mark.parametrize("data", sorted(INPUTS))
@pytest.mark.parametrize("name", MODELS)
def test_member_protocol(name, data):
    """stem -> stages -> head; stage outputs have `stage_channels`; logits (B, classes) at any input size.

    Shapes only, on the meta device, so it is free even for WRN-28-10 on 32x32.
    """
    cin, size, classes = INPUTS[data]
    with torch.device("meta"):
        net = create_model(name, cin, classes)
        x = torch.zeros(2, cin, size, size)
        assert isinstance(net.stages, nn.ModuleList) and len(net.stages) >= 1
        assert len(net.stage_channels) == len(net.stages)
        h = net.stem(x)
        for stage, channels in zip(net.stages, net.stage_channels):
            h = stage(h)
            assert h.shape[0] == 2 and h.shape[1] == channels
            assert all(d >= 1 for d in h.shape[2:])  # tiny inputs never shrink to 0
        assert net.head(h).shape == (2, classes)
        assert net(x).shape == (2, classes)


@pytest.mark.parametrize("data", sorted(INPUTS))
@pytest.mark.parametrize("name", PARAMS)
def test_forward(name, data):
    """Real numbers: finite logits and forward == head(stages(stem(x))), train and eval mode."""
    cin, size, classes = INPUTS[data]
    torch.manual_seed(0)
    net = create_model(name, cin, classes)
    x = torch.rand(2, cin, size, size)
    with torch.no_grad():
        assert net(x).shape == (2, classes)
        net.eval()
        h = net.stem(x)
        for stage in net.stages:
            h = stage(h)
        out = net.head(h)
        assert out.shape == (2, classes) and torch.isfinite(out).all()
        torch.testing.assert_close(net(x), out)


# -- in an ensemble sharing one bank with wrn-10-2 -------------------------------------------------


@pytest.fixture(scope="module", params=PARAMS)
def pair(request):
    """(name, config, model): the member + wrn-10-2 on digits, method superweights, budget 0.2."""
    name = request.param
    config = load_config(None, [f'ensemble.members=["{name}", "{PARTNER}"]', f"bank.budget={BUDGET}"])
    model = build_ensemble(config, DIGITS)
    assert isinstance(model, SuperWeightEnsemble)
    return name, config, model


def test_exact_budget(pair):
    name, config, model = pair
    slot_weights = 0
    for n in (name, PARTNER):
        slot_weights += sum(m.weight.numel() for m in meta_model(n, 1, 10).modules() if isinstance(m, SLOT_TYPES))
    expected = round(BUDGET * slot_weights)
    assert model.bank.bank.numel() == model.plan.budget == model.plan.bank_params == expected
    summary = plan_summary(config, DIGITS)
    assert summary["budget"] == summary["bank_params"] == expected
    assert summary["slot_weights"] == slot_weights
    # Every conv/linear weight of the member is generated: none left as a private Parameter.
    member = model.members[0]
    assert len(model.slots_of[0]) == sum(isinstance(m, SLOT_TYPES) for m in member.modules())
    assert all(m.weight is None or not isinstance(m.weight, nn.Parameter) for m in member.modules() if isinstance(m, SLOT_TYPES))


def test_backward_reaches_bank_from_member_alone(pair):
    _, _, model = pair
    model.train()
    model.zero_grad(set_to_none=True)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    logits = model(x, members=[0])
    assert logits.shape == (4, 1, 10)
    F.cross_entropy(logits[:, 0], y).backward()
    grad = model.bank.bank.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert model.bank.coefficients.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.members[1].parameters())  # the partner did not run
    model.zero_grad(set_to_none=True)


def test_materialized_equals_bank_backed(pair):
    name, _, model = pair
    model.eval()
    try:
        x = torch.rand(4, 1, 8, 8)
        with torch.no_grad():
            expected = model(x)
            plain = model.materialize()
            got = plain(x)
    finally:
        model.train()
    assert type(plain) is StackedEnsemble and not any(n.startswith("bank") for n, _ in plain.named_parameters())
    assert got.shape == (4, 2, 10)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert count(plain.members[0]) == count(meta_model(name, 1, 10)) == reference_params(name, 1, 10)


# -- a mixed ensemble trained from one bank ---------------------------------------------------------

MIXED = ["wrn-10-2", "resnet-18-16", "mobilenetv2-50", "mlp-256-2"]


def test_mixed_ensemble_trains_from_one_bank(tmp_path):
    from ensemble.loop import fit

    config = load_config(None, [
        "ensemble.members=" + "[" + ", ".join(f'"{n}"' for n in MIXED) + "]",
        "bank.budget=0.25", "train.epochs=1", "data.train_per_class=10",
    ])
    initial = build_ensemble(config, DIGITS).bank.bank.detach().clone()
    result = fit(config, out_dir=tmp_path, progress=False, log=lambda s: None)
    model = result.model
    summary = plan_summary(config, DIGITS)
    assert model.bank.bank.numel() == summary["budget"] == round(0.25 * summary["slot_weights"])
    assert [r["name"] for r in summary["members"]] == MIXED
    kinds = {g["kind"] for g in summary["groups"]}
    assert {"conv3x3", "conv1x1", "dwconv3x3", "linear"} <= kinds
    # Linear slots of the MLP share groups with the conv members' classifiers.
    assert any(
        g["kind"] == "linear" and any(s.startswith("mlp") for s in g["slots"]) and any(not s.startswith("mlp") for s in g["slots"])
        for g in summary["groups"]
    )
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    assert not torch.equal(model.bank.bank.detach().cpu(), initial)  # the bank was trained
    assert set(result.metrics["members"]) == set(MIXED)
    assert 0.0 <= result.metrics["ensemble"]["accuracy"] <= 1.0

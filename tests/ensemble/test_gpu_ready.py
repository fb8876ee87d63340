"""GPU readiness, exercised on the CPU: train.precision (bf16 autocast, generation in fp32), train.channels_last,
train.compile (with its one-line fallback), and no hard-coded `.cuda` calls anywhere."""

from pathlib import Path

import pytest
import torch

import ensemble.training as training
from core.errors import SuperweightsError
from ensemble.data import load_data
from ensemble.loop import fit
from ensemble.methods import build_ensemble
from ensemble.training import Accelerator, autocast_loss, model_loss

from .conftest import DIGITS, cfg

TINY = ('ensemble.members=["wrn-10-1","wrn-10-2"]', "train.epochs=1", "data.train_per_class=10")
ROOT = Path(__file__).resolve().parents[2]


def _fit(*overrides):
    return fit(cfg(*TINY, *overrides), None, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def batch():
    c = cfg(*TINY)
    data = load_data(c.data, 0, 16, 64)
    return data.info, next(iter(data.train))


def test_train_keys_are_validated():
    assert cfg().train.precision == "fp32" and cfg().train.channels_last is None and cfg().train.compile is False
    with pytest.raises(SuperweightsError, match="^train.precision must be fp32 or bf16, got 'fp16'$"):
        cfg("train.precision=fp16")
    with pytest.raises(SuperweightsError, match="^train.channels_last must be true or false"):
        cfg("train.channels_last=1")
    with pytest.raises(SuperweightsError, match="^train.compile must be true or false"):
        cfg('train.compile="yes"')


@pytest.mark.parametrize("method", ["superweights", "ssn"])
def test_bf16_autocasts_the_members_but_generates_weights_in_fp32(batch, method):
    info, (x, y) = batch
    model = build_ensemble(cfg(*TINY, f"bank.method={method}"), info)
    seen = []
    model.bank.register_forward_hook(
        lambda mod, args, out: seen.append((torch.is_autocast_enabled("cpu"), {w.dtype for w in out if w is not None})))
    loss, logits = autocast_loss(model, x, y, None, "bf16")
    assert seen == [(False, {torch.float32})]  # generated once, outside the autocast region, in fp32
    assert loss.dtype == logits.dtype == torch.float32
    loss.backward()
    assert model.bank.bank.grad.dtype == torch.float32 and torch.isfinite(model.bank.bank.grad).all()
    with torch.no_grad():
        ref, _ = model_loss(model, x, y)
    assert abs(float(loss.detach()) - float(ref)) < 0.05 * float(ref)  # bf16 convs: close, not equal


def test_bf16_trains_on_cpu():
    """Decision: CPU bf16 autocast works (torch 2.14), so `train.precision = "bf16"` is honoured on CPU too
    rather than refused; on CUDA it is refused (one line) only where the GPU has no bf16."""
    result = _fit("train.precision=bf16")
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_channels_last_gives_the_contiguous_loss():
    a = _fit("bank.method=full", "train.channels_last=false")
    b = _fit("bank.method=full", "train.channels_last=true")
    assert abs(a.history[0]["train_loss"] - b.history[0]["train_loss"]) < 1e-4
    assert abs(a.history[0]["val_nll"] - b.history[0]["val_nll"]) < 1e-4
    conv = next(m for m in b.model.members[0].modules() if isinstance(m, torch.nn.Conv2d))  # stored NHWC
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dim() == 4


@pytest.mark.parametrize("method", ["superweights", "ssn"])
def test_channels_last_banks_generate_channels_last_weights(batch, method):
    """`train.channels_last` (true, or unset: the default) makes the bank one for channels_last convolutions (cells, or SSN vectors,
    read as [O, kh, kw, I]): its 3x3 conv weights come out as channels_last views of the flat buffer, so no
    convolution converts them. The memory format still changes nothing computed: the same bank run with
    row-major convolutions gives the same loss and gradients."""
    result = _fit(f"bank.method={method}", "train.channels_last=true")
    bank = result.model.bank
    assert int(bank.channels_last) == 1 and int(_fit(f"bank.method={method}").model.bank.channels_last) == 1
    assert int(_fit(f"bank.method={method}", "train.channels_last=false").model.bank.channels_last) == 0
    convs = [w for w, s in zip(bank(), result.model.plan.slots) if len(s.shape) == 4 and s.shape[1] > 1 and s.shape[2] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    info, (x, y) = batch
    losses, grads = [], []
    for members_cl in (False, True):
        model = build_ensemble(cfg(*TINY, f"bank.method={method}"), info, channels_last=True)
        accel = Accelerator(cfg(*TINY, f"train.channels_last={str(members_cl).lower()}"), torch.device("cpu"))
        accel.prepare(model)
        loss, _ = model_loss(model, accel.inputs(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append(model.bank.bank.grad.clone())
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5 * grads[0].abs().max().item())


def test_channels_last_is_on_by_default_on_every_device():
    assert Accelerator(cfg(*TINY), torch.device("cpu")).channels_last is True
    assert Accelerator(cfg(*TINY), torch.device("cuda")).channels_last is True  # no CUDA query for fp32
    assert Accelerator(cfg(*TINY, "train.channels_last=false"), torch.device("cpu")).channels_last is False
    assert Accelerator(cfg(*TINY, "train.channels_last=false"), torch.device("cuda")).channels_last is False
    info = DIGITS  # with the dataset: only members with convs
    assert Accelerator(cfg(*TINY), torch.device("cpu"), info).channels_last is True
    mlp = cfg(*TINY, 'ensemble.members=["mlp-32-1","mlp-16-2"]', "train.channels_last=true")
    assert Accelerator(mlp, torch.device("cpu"), info).channels_last is False


def test_compile_trains_with_the_same_loss(monkeypatch, capfd):
    """Dynamo traces the members ("eager" backend: no code generation, so seconds on a CPU); the compiled
    members are only in place during steps (materialize deep-copies members)."""
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    plain = _fit()
    compiled = _fit("train.compile=true")
    assert "warning" not in capfd.readouterr().err
    assert abs(plain.history[0]["train_loss"] - compiled.history[0]["train_loss"]) < 1e-4
    assert all(m._compiled_call_impl is None for m in compiled.model.members)


def test_compile_covers_every_member_of_a_large_same_class_ensemble(monkeypatch, capfd):
    """Ten WideResNets of different depths and widths: one graph per architecture under one code object, past
    dynamo's default limit of 8 (the ninth and tenth used to run eagerly, said only by a torch log line)."""
    import torch._dynamo

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(training, "COMPILE_BACKEND", counting)
    torch._dynamo.reset()
    names = ["wrn-10-1", "wrn-10-2", "wrn-10-3", "wrn-10-4", "wrn-16-1", "wrn-16-2", "wrn-16-3", "wrn-22-1",
             "wrn-22-2", "wrn-28-1"]
    members = "ensemble.members=[" + ",".join(f'"{n}"' for n in names) + "]"
    # the default limit, whatever ran before (dynamo's own patcher: pytest's monkeypatch on its config module
    # breaks the module for every later reader)
    try:
        with torch._dynamo.config.patch(recompile_limit=8):
            result = fit(cfg(members, "train.epochs=1", "data.train_per_class=10", "train.compile=true"), None,
                         progress=False, log=lambda s: None)
    finally:
        torch._dynamo.reset()  # (its ten graphs would count against the next test's limit)
    err = capfd.readouterr().err
    assert "recompile_limit" not in err and "warning" not in err, err
    assert len(graphs) >= 10 and len(result.history) == 1


def test_compile_falls_back_with_one_warning_line(monkeypatch, capfd):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here\nsecond line of detail")

    monkeypatch.setattr(training, "COMPILE_BACKEND", broken)
    plain = _fit()
    result = _fit("train.compile=true", "data.train_per_class=20")  # 200 images: several steps after the failure
    err = capfd.readouterr().err.strip().splitlines()
    warnings = [line for line in err if "train.compile" in line]
    assert len(warnings) == 1, err
    assert warnings[0].startswith("superweights: warning: train.compile: torch.compile failed here")
    assert "training continues without it" in warnings[0]
    assert len(result.history) == 1 and result.metrics  # trained and tested
    assert plain.history[0]["train_loss"] > 0


@pytest.mark.slow
def test_compile_with_inductor_trains():
    """The real backend (C++ code generation on a CPU: minutes on 2 shared cores)."""
    result = _fit("train.compile=true")
    assert len(result.history) == 1 and result.metrics


def test_no_source_file_calls_cuda():
    """The device comes from config/CLI (`--device`): never a `.cuda` call."""
    needle = "." + "cuda("
    offenders = [str(p.relative_to(ROOT)) for folder in ("core", "ensemble", "anytime", "ray_jobs", "bench", "tests")
                 for p in (ROOT / folder).rglob("*.py") if needle in p.read_text()]
    assert not offenders, offenders

"""The CUDA path (`--device cuda`, issue 16 item 2), run where a GPU is: skipped without one (CI has none).

`bench/device_check.sh` runs this module and the CUDA benchmark table in one call on a lent GPU machine. What it
checks is what the CPU tests cannot: batched generation and its gradients on CUDA kernels (cuBLAS bmm, CUDA
embedding_bag and scatter_add_) against the CPU's, member-parallel subset programs against the full one there,
and the training loop (`ensemble.loop.fit`, what every worker of `superweights train` runs) on a GPU in fp32, in
bf16 with channels_last members and with torch.compile, its checkpoint loading back on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from core.bank import SuperWeightBank
from core.plan import build_plan
from ensemble.checkpoint import load_checkpoint
from ensemble.data import load_data
from ensemble.loop import fit
from ensemble.training import evaluate
from tests.core.test_generation import DIGITS, banks, loss_grads, traced
from tests.ensemble.conftest import cfg

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (bench/device_check.sh)")]

TINY = ('ensemble.members=["wrn-10-1","wrn-10-2"]', "train.epochs=2", "data.train_per_class=10")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """Full fp32 matmuls and convolutions (no TF32), so CUDA is compared with the CPU to fp32 rounding."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("budget", [0.01, 0.5, 2.0])
@pytest.mark.parametrize("family", ["wrn", "resnet", "mobilenetv2", "mlp"])
def test_generation_on_cuda_equals_the_cpu_weights_and_gradients(family, budget):
    for kind, bank in banks(family, budget):
        cpu = [None if w is None else w.detach().clone() for w in bank()]
        g_cpu = loss_grads(bank, bank())
        bank.to("cuda")
        new = bank()
        for i, (a, b) in enumerate(zip(new, cpu)):
            assert a.device.type == "cuda" and a.dtype == torch.float32, (kind, i)
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6, msg=f"{kind} slot {i}")
        g_cuda = loss_grads(bank, new)
        for x, y in zip(g_cuda, g_cpu):
            if y is not None:
                torch.testing.assert_close(x.cpu(), y, rtol=0, atol=1e-5 * max(1.0, y.abs().max().item()), msg=kind)


def test_member_parallel_subsets_equal_the_full_program_on_cuda():
    """A worker's program (its members' slots) against the full one, on CUDA, to fp32 rounding (on the CPU they
    are bit for bit equal, tests/core; CUDA's scatter_add_ adds atomically, in no fixed order)."""
    plan = build_plan(traced(DIGITS, channels=1, size=8), 0.5)
    bank = SuperWeightBank(plan, torch.Generator().manual_seed(0)).to("cuda")
    full = bank()
    g_full = loss_grads(bank, full)
    for members in [(0,), (1, 2, 3), (3,)]:
        ids = [i for m in members for i in plan.member_slots(m)]
        part = bank(slots=ids)
        for i in ids:
            torch.testing.assert_close(part[i], full[i], rtol=0, atol=1e-6, msg=f"{members} slot {i}")
        g_part = loss_grads(bank, part)
        g_ref = loss_grads(bank, [w if i in ids else None for i, w in enumerate(bank())])
        for x, y in zip(g_part, g_ref):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6 * max(1.0, y.abs().max().item()))
    assert g_full[0].device.type == "cuda"


@pytest.mark.parametrize("method", ["superweights", "ssn", "full"])
def test_training_on_cuda_in_fp32_matches_the_cpu(method):
    """Two epochs of the loop on the GPU and on the CPU from the same seed: the same ensemble up to the rounding
    that different kernels accumulate (the test accuracies within 2 of 20 images per class). channels_last on both
    (CUDA's default): a SuperWeight bank made for it is another model than a row-major one."""
    results = {d: fit(cfg(*TINY, f"bank.method={method}", "train.channels_last=true"), None, device=d,
                      progress=False, log=lambda s: None)
               for d in ("cpu", "cuda")}
    gpu, cpu = results["cuda"], results["cpu"]
    assert next(gpu.model.parameters()).device.type == "cuda"
    assert len(gpu.history) == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in gpu.history)
    assert abs(gpu.history[0]["train_loss"] - cpu.history[0]["train_loss"]) <= 1e-3 * abs(cpu.history[0]["train_loss"])
    assert abs(gpu.metrics["ensemble"]["accuracy"] - cpu.metrics["ensemble"]["accuracy"]) <= 0.02


@pytest.mark.parametrize("method", ["superweights", "full"])
def test_bf16_channels_last_training_on_cuda_keeps_generation_in_fp32(method, tmp_path):
    """bf16 autocast with channels_last (the default): finite losses, the bank and its generation in fp32,
    conv weights in channels_last (a SuperWeight bank made for it generates them so), and the checkpoint loads
    back on a CPU (what `superweights evaluate` / `serve` do by default) with the same test metrics."""
    result = fit(cfg(*TINY, "train.precision=bf16", f"bank.method={method}"), tmp_path / "run", device="cuda",
                 progress=False, log=lambda s: None)
    model = result.model
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
    if method == "superweights":
        assert model.bank.bank.dtype == torch.float32 and model.bank.bank.device.type == "cuda"
        assert int(model.bank.channels_last) == 1
        weights = [w for w in model.bank() if w is not None]
        assert all(w.dtype == torch.float32 for w in weights)
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights if w.dim() == 4)
    else:
        convs = [m for m in model.members.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    config, _, loaded, _ = load_checkpoint(result.out_dir, "cpu")
    assert next(loaded.parameters()).device.type == "cpu"
    test = load_data(config.data, config.train.seed, 64, 0, "cpu").test
    on_cpu = evaluate(loaded, test, "cpu")["ensemble"]["accuracy"]
    assert abs(on_cpu - result.metrics["ensemble"]["accuracy"]) <= 1.5 / test.num_examples  # a tie, at most


def test_compile_on_cuda_trains_without_falling_back(capfd):
    result = fit(cfg(*TINY, "train.compile=true"), None, device="cuda", progress=False, log=lambda s: None)
    assert len(result.history) == 2 and result.metrics["ensemble"]["accuracy"] > 0.0
    assert "torch.compile failed" not in capfd.readouterr().err


def test_materialised_members_on_cuda_predict_what_the_bank_generates():
    result = fit(cfg(*TINY), None, device="cuda", progress=False, log=lambda s: None)
    model = result.model.eval()
    x = torch.rand(16, 1, 8, 8, device="cuda")
    with torch.no_grad():
        generated = model(x)
        plain = model.materialize().eval()(x)
    torch.testing.assert_close(plain, generated, rtol=0, atol=1e-5)

import json

import pytest
import torch

from core.errors import SuperweightsError
from ensemble.checkpoint import load_checkpoint
from ensemble.loop import fit
from ensemble.training import ensemble_loss

from .conftest import cfg

TINY = ('ensemble.members=["wrn-10-2","wrn-10-1"]', "train.epochs=2", "data.train_per_class=15", "train.batch_size=32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    return fit(cfg(*TINY, "bank.budget=0.4"), out, progress=False, log=lambda s: None), out


def test_loss_is_sum_of_member_cross_entropies():
    logits, y = torch.randn(6, 3, 10), torch.randint(0, 10, (6,))
    expected = sum(torch.nn.functional.cross_entropy(logits[:, m], y) for m in range(3))
    torch.testing.assert_close(ensemble_loss(logits, y), expected)


def test_checkpoint_folder_and_metrics_keys(trained):
    result, out = trained
    assert {p.name for p in out.iterdir()} >= {"weights.safetensors", "plan.json", "config.json", "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["members"]) == {"wrn-10-2", "wrn-10-1"}
    assert 0.0 <= metrics["ensemble"]["accuracy"] <= 1.0
    assert len(metrics["history"]) == 2
    assert metrics["ensemble"]["accuracy"] == result.metrics["ensemble"]["accuracy"]


def test_checkpoint_reloads_to_the_same_outputs(trained):
    result, out = trained
    config, info, model, metrics = load_checkpoint(out)
    x = torch.rand(7, *[info.in_channels, *info.image_size])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x), atol=1e-6, rtol=0)
    assert config.bank.budget == 0.4 and metrics["ensemble"] == result.metrics["ensemble"]


def test_training_is_reproducible_from_the_seed(trained):
    result, _ = trained
    again = fit(cfg(*TINY, "bank.budget=0.4"), None, progress=False, log=lambda s: None)
    assert again.metrics == result.metrics
    assert torch.equal(again.model.bank.bank, result.model.bank.bank)


def test_full_baseline_trains_and_learns():
    result = fit(cfg(*TINY, 'bank.method="full"', "train.epochs=3"), None, progress=False, log=lambda s: None)
    assert result.metrics["ensemble"]["accuracy"] > 0.5
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_bad_checkpoints_are_one_line_errors(trained, tmp_path):
    _, out = trained
    with pytest.raises(SuperweightsError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(SuperweightsError, match="missing weights.safetensors, plan.json, metrics.json"):
        load_checkpoint(partial)
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    for f in ("weights.safetensors", "plan.json", "metrics.json"):
        (mismatched / f).write_bytes((out / f).read_bytes())
    config = json.loads((out / "config.json").read_text())
    config["ensemble"]["members"] = ["wrn-10-2", "wrn-16-1"]
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(SuperweightsError, match="does not match"):
        load_checkpoint(mismatched)


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SuperweightsError, match="no CUDA device"):
        fit(cfg(*TINY), None, device="cuda", progress=False, log=lambda s: None)

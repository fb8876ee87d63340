"""`{"mean_flops": F}` and `{"confidence": c}` over real HTTP (uvicorn in a thread): answers equal the
predictor's row by row, per-image steps and FLOPs in the response, /model documents the ranges, bad values and
unavailable budgets are 422 while the server keeps serving, and micro-batching does not change anyone's rows."""

import asyncio
import json

import httpx
import pytest
import torch

from anytime.budget import ConfidenceBudget, MeanFlopsBudget
from anytime.http_app import create_app
from anytime.predictor import AnytimePredictor
from anytime.record import FITTED
from anytime.serve_service import AnytimeService, ServeSettings
from anytime.serve_thread import serve_in_thread
from anytime.store import load_anytime

SETTINGS = ServeSettings(max_images=64, max_batch_images=64, batch_window_ms=5.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference(exits_ckpt):
    return AnytimePredictor.from_checkpoint(load_anytime(exits_ckpt[1]))


@pytest.fixture(scope="module")
def client(exits_ckpt):
    with serve_in_thread(create_app(AnytimeService.from_folder(exits_ckpt[1], SETTINGS))) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        yield c


def images(n, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def post(client, x, budget):
    return client.post("/predict", json={"inputs": x.tolist(), "budget": budget})


def same_rows(out: dict, ref, x):
    assert out["image_steps"] == ref.image_steps and out["image_flops"] == ref.image_flops
    n = max(ref.image_steps)
    assert out["steps"] == [list(s) for s in ref.steps[:n]] and out["flops"] == ref.image_flops[
        ref.image_steps.index(n)]
    assert out["predictions"] == ref.probs.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(out["probabilities"]), ref.probs, atol=1e-6, rtol=0)


def test_confidence_and_mean_flops_answers_equal_the_predictor(client, reference):
    x = images(32, seed=3)
    cum = reference.cumulative_flops
    for budget in ({"confidence": 0.0}, {"confidence": 0.6}, {"confidence": 0.9}, {"confidence": 1.0},
                   {"mean_flops": cum[0]}, {"mean_flops": (cum[0] + cum[-1]) / 2}, {"mean_flops": cum[-1] * 2}):
        r = post(client, x, budget)
        assert r.status_code == 200, r.text
        out = r.json()
        kind = ConfidenceBudget if "confidence" in budget else MeanFlopsBudget
        ref = reference.predict(x, budget=kind(float(next(iter(budget.values())))))
        same_rows(out, ref, x)
        assert out["confidence"] == ref.level and len(out["image_steps"]) == len(x)
        assert max(out["image_flops"]) <= cum[-1]
    full = post(client, x, {"confidence": 1.0}).json()
    assert full["image_steps"] == [len(cum)] * len(x) and full["flops"] == cum[-1]
    assert post(client, x, {"confidence": 0.0}).json()["image_flops"] == [cum[0]] * len(x)
    fixed = post(client, x, {"flops": cum[1]}).json()  # the fixed budgets report per image too, and no level
    assert fixed["image_steps"] == [2] * len(x) and fixed["image_flops"] == [cum[1]] * len(x)
    assert fixed["confidence"] is None


def test_model_documents_the_new_budget_ranges(client, reference):
    b = client.get("/model").json()["budget"]
    assert b["mean_flops"]["min"] == reference.table[0]["bound"] == reference.min_flops
    assert b["mean_flops"]["max"] == reference.table[-1]["bound"]
    assert (b["confidence"]["min"], b["confidence"]["max"], b["confidence"]["score"]) == (0, 1, "max_prob")


def test_unavailable_early_exit_budgets_are_422_and_the_server_keeps_serving(client, reference, exits_ckpt,
                                                                             tmp_path):
    r = post(client, images(1), {"mean_flops": reference.min_flops - 1})
    assert r.status_code == 422 and f"minimum is {reference.min_flops:,} FLOPs" in r.json()["detail"]
    assert post(client, images(1), {"mean_flops": reference.min_flops}).status_code == 200
    import shutil

    bare = tmp_path / "bare"  # a record that could not be fitted (no validation data): no thresholds
    shutil.copytree(exits_ckpt[1], bare)
    record = json.loads((bare / "anytime.json").read_text())
    ck = load_anytime(exits_ckpt[1])
    ck.record = {k: v for k, v in record.items() if k not in FITTED}
    service = AnytimeService(ck, SETTINGS)
    with serve_in_thread(create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = post(c, images(1), {"mean_flops": 1e9})
        assert r.status_code == 422 and "no early-exit thresholds" in r.json()["detail"]
        assert c.get("/model").json()["budget"]["mean_flops"] is None
        assert post(c, images(2), {"confidence": 0.5}).status_code == 200


def test_concurrent_early_exit_requests_batch_without_changing_their_rows(exits_ckpt, reference):
    service = AnytimeService.from_folder(exits_ckpt[1], SETTINGS)
    budget = {"confidence": 0.7}
    xs = [images(n, seed=10 + n) for n in (1, 3, 5, 2)]

    async def run():
        app = create_app(service)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*[c.post("/predict", json={"inputs": x.tolist(), "budget": budget})
                                          for x in xs])

    answers = [r.json() for r in asyncio.run(run())]
    assert max(a["batch_images"] for a in answers) > 1  # they did share a batch
    for x, a in zip(xs, answers):
        same_rows(a, reference.predict(x, budget=ConfidenceBudget(0.7)), x)

"""The anytime HTTP app on a real uvicorn server (ephemeral loopback port, server thread) with a real HTTP
client: answers equal the predictor's, budgets hold, every bad input is a 4xx JSON error while good
requests keep succeeding, concurrent requests are micro-batched without changing anyone's answer."""

import asyncio
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from anytime.batching import Item
from anytime.budget import UNLIMITED
from anytime.http_app import create_app
from anytime.predictor import AnytimePredictor
from anytime.serve_schemas import ApiError
from anytime.serve_service import AnytimeService, ServeSettings
from anytime.serve_thread import serve_in_thread
from anytime.store import check_weights_file, load_anytime
from core.errors import SuperweightsError

SETTINGS = ServeSettings(max_body_bytes=2**16, max_images=16, max_batch_images=16, batch_window_ms=5.0)
SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py, as `serve --threads 1`


@pytest.fixture(scope="module")
def folder(exits_ckpt):
    return exits_ckpt[1]


@pytest.fixture(scope="module")
def reference(folder):
    """The plain predictor the server must agree with."""
    return AnytimePredictor.from_checkpoint(load_anytime(folder))


@pytest.fixture(scope="module")
def service(folder):
    return AnytimeService.from_folder(folder, SETTINGS)


@pytest.fixture(scope="module")
def client(service):
    with serve_in_thread(create_app(service)) as url, httpx.Client(base_url=url, timeout=20) as c:
        yield c


def images(n, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def post(client, x, budget):
    return client.post("/predict", json={"inputs": x.tolist(), "budget": budget})


def assert_matches(out, reference, x, budget):
    flops = budget.get("flops") if budget else None
    ref = reference.predict(x, budget_flops=flops)
    assert out["steps"] == [list(s) for s in ref.steps]
    assert out["flops"] == ref.flops
    assert out["predictions"] == ref.probs.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(out["probabilities"]), ref.probs, atol=1e-5, rtol=0)
    if flops is not None:
        assert out["flops"] <= flops


def assert_ok(client, x=None, budget=None):
    x = images(2, seed=99) if x is None else x
    r = post(client, x, budget)
    assert r.status_code == 200, r.text
    return r.json()


# -- good requests ----------------------------------------------------------------------------------------


def test_health_model_and_openapi(client, reference):
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = client.get("/model").json()
    assert m["members"] == ["wrn-10-2", "wrn-10-1"] and m["input_shape"] == list(SHAPE)
    assert [e["num_exits"] for e in m["exits"]] == [3, 3]
    assert [[s["member"], s["exit"]] for s in m["schedule"]] == [list(s) for s in reference.steps]
    assert [s["cumulative_flops"] for s in m["schedule"]] == reference.cumulative_flops
    assert m["budget"]["flops"] == {**m["budget"]["flops"], "min": reference.cumulative_flops[0],
                                    "max": reference.cumulative_flops[-1]}
    assert 0 < m["budget"]["ms"]["min"] < m["budget"]["ms"]["max"]
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {"/predict", "/model", "/health"}
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/PredictRequest")
    assert {"inputs", "budget"} <= set(spec["components"]["schemas"]["PredictRequest"]["properties"])
    assert client.get("/docs").status_code == 200


def test_predictions_equal_the_predictor_for_every_flops_budget(client, reference):
    x = images(3)
    budgets = [None]
    for c in reference.cumulative_flops:
        budgets += [{"flops": c}, {"flops": c + 1}, {"flops": c - 1}]
    budgets.append({"flops": 10 * reference.cumulative_flops[-1]})
    budgets = [b for b in budgets if b is None or b["flops"] >= reference.min_flops]
    for budget in budgets:
        out = assert_ok(client, x, budget)
        assert_matches(out, reference, x, budget)
        assert out["deadline_met"] is None and out["elapsed_ms"] > 0
        assert set(out) == {"predictions", "probabilities", "steps", "flops", "elapsed_ms", "deadline_met",
                            "batch_images", "image_steps", "image_flops", "confidence"}
        assert all(math.isclose(sum(p), 1.0, abs_tol=1e-5) for p in out["probabilities"])


def test_deadlines(client, reference):
    x = images(4, seed=1)
    generous = assert_ok(client, x, {"ms": 2000})
    assert generous["deadline_met"] is True and generous["elapsed_ms"] <= 2000
    assert_matches(generous, reference, x, None)  # every step fits
    tiny = assert_ok(client, x, {"ms": 0.001})  # the first step always runs; the deadline is reported missed
    assert tiny["steps"] == [list(reference.steps[0])] and tiny["flops"] == reference.cumulative_flops[0]
    assert tiny["deadline_met"] is False
    for ms in (0.5, 2, 5, 50):
        out = assert_ok(client, x, {"ms": ms})
        n = len(out["steps"])
        assert out["steps"] == [list(s) for s in reference.steps[:n]] and n >= 1
        assert out["flops"] == reference.cumulative_flops[n - 1]
        assert out["deadline_met"] == (out["elapsed_ms"] <= ms)


# -- bad requests -----------------------------------------------------------------------------------------

GOOD = images(1).tolist()


def body(inputs=GOOD, budget=None, **extra):
    return json.dumps({"inputs": inputs, "budget": budget, **extra}).encode()


def raw_inputs(token):
    """A body whose first pixel is the raw JSON token (NaN, Infinity, ... which json.dumps cannot write)."""
    text = body()
    first = json.dumps(GOOD[0][0][0][0])
    return text.replace(first.encode(), token.encode(), 1)


BAD = {
    "malformed JSON": (b'{"inputs": [[[[0.1,', 400, "malformed JSON"),
    "empty body": (b"", 400, "malformed JSON"),
    "not an object": (b"[1, 2, 3]", 422, "must be a JSON object"),
    "missing inputs": (b'{"budget": null}', 422, "inputs is required"),
    "missing budget": (json.dumps({"inputs": GOOD}).encode(), 422, "budget is required"),
    "unknown field": (body(extra=1), 422, "unknown field 'extra'"),
    "3-d inputs": (body(GOOD[0]), 422, "nested lists shaped (N, 1, 8, 8)"),
    "wrong channels": (body(images(1).expand(1, 3, 8, 8).tolist()), 422, "got (1, 3, 8, 8)"),
    "wrong size": (body(torch.rand(1, 1, 7, 7).tolist()), 422, "got (1, 1, 7, 7)"),
    "empty batch": (body([]), 422, "N >= 1"),
    "ragged": (body([[[[0.1] * 8] * 7 + [[0.1] * 5]]]), 422, "unequal lengths"),
    "string pixel": (raw_inputs('"0.5"'), 422, "inputs must be numbers"),
    "bool pixel": (raw_inputs("true"), 422, "inputs must be numbers"),
    "null pixel": (raw_inputs("null"), 422, "inputs must be numbers"),
    "NaN": (raw_inputs("NaN"), 422, "finite"),
    "Infinity": (raw_inputs("Infinity"), 422, "finite"),
    "-Infinity": (raw_inputs("-Infinity"), 422, "finite"),
    "1e999": (raw_inputs("1e999"), 422, "finite"),
    "beyond float32": (raw_inputs("1e39"), 422, "finite"),
    "out of range": (body((images(1) * 16).tolist()), 422, "must lie in [0, 1]"),
    "too many images": (body(images(17).tolist()), 413, "limit is 16"),
    "too large": (body(torch.rand(60, 1, 8, 8).tolist()), 413, "over the limit of 65,536 bytes"),
    "budget not an object": (body(budget=5), 422, "budget must be"),
    "budget list": (body(budget=[1]), 422, "budget must be"),
    "empty budget": (body(budget={}), 422, "exactly one"),
    "null flops": (body(budget={"flops": None}), 422, "exactly one"),
    "both kinds": (body(budget={"flops": 1e7, "ms": 5}), 422, "exactly one"),
    "unknown kind": (body(budget={"joules": 5}), 422, "unknown budget kind 'joules'"),
    "negative flops": (body(budget={"flops": -5}), 422, "budget.flops must be > 0"),
    "zero flops": (body(budget={"flops": 0}), 422, "budget.flops must be > 0"),
    "zero ms": (body(budget={"ms": 0}), 422, "budget.ms must be > 0"),
    "negative ms": (body(budget={"ms": -3.5}), 422, "budget.ms must be > 0"),
    "string flops": (body(budget={"flops": "1e6"}), 422, "budget.flops must be a finite number"),
    "bool ms": (body(budget={"ms": True}), 422, "budget.ms must be a finite number"),
    "both early-exit kinds": (body(budget={"mean_flops": 1e6, "confidence": 0.5}), 422, "exactly one"),
    "zero mean_flops": (body(budget={"mean_flops": 0}), 422, "budget.mean_flops must be > 0"),
    "negative mean_flops": (body(budget={"mean_flops": -1}), 422, "budget.mean_flops must be > 0"),
    "string mean_flops": (body(budget={"mean_flops": "5"}), 422, "budget.mean_flops must be a finite number"),
    "confidence above 1": (body(budget={"confidence": 1.5}), 422, "budget.confidence must be a number in [0, 1]"),
    "negative confidence": (body(budget={"confidence": -0.1}), 422, "budget.confidence must be a number in [0, 1]"),
    "null confidence": (body(budget={"confidence": None}), 422, "exactly one"),
    "bool confidence": (body(budget={"confidence": False}), 422, "budget.confidence must be a finite number"),
    "NaN ms": (b'{"inputs": ' + json.dumps(GOOD).encode() + b', "budget": {"ms": NaN}}', 422,
               "budget.ms must be a finite number"),
}


def assert_error(r, status, text):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and text in detail, detail
    assert "Traceback" not in r.text and "\n" not in detail


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(client, case):
    data, status, text = BAD[case]
    assert_error(client.post("/predict", content=data, headers={"content-type": "application/json"}), status, text)
    assert_ok(client)


def test_flops_budget_below_the_first_step_names_the_minimum(client, reference):
    r = post(client, images(1), {"flops": reference.min_flops - 1})
    assert_error(r, 422, f"the minimum budget is {reference.min_flops:,} FLOPs per image")
    assert_ok(client, budget={"flops": reference.min_flops})


def test_oversized_streamed_body_without_content_length(client):
    def chunks():
        yield b'{"inputs": ['
        for _ in range(100):
            yield json.dumps(images(1).tolist()[0]).encode() + b","
        yield b"[]], \"budget\": null}"

    assert_error(client.post("/predict", content=chunks(), headers={"content-type": "application/json"}), 413,
                 "over the limit")
    assert_ok(client)


def test_wrong_route_and_method_are_json(client):
    assert_error(client.get("/nowhere"), 404, "Not Found")
    assert_error(client.get("/predict"), 405, "Method Not Allowed")
    assert_ok(client)


def test_internal_error_is_a_generic_500_and_the_server_recovers(client, service, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service.predictor, "predict", boom)
    r = post(client, images(1), None)
    assert_error(r, 500, "internal server error")
    assert "secret" not in r.text
    monkeypatch.undo()
    assert_ok(client)


@pytest.mark.parametrize("content_type, text", [
    (None, "send the header Content-Type: application/json"),
    ("text/plain", "unsupported Content-Type 'text/plain'"),
    ("text/plain; charset=utf-8", "unsupported Content-Type 'text/plain'"),
    ("application/x-www-form-urlencoded", "unsupported Content-Type 'application/x-www-form-urlencoded'"),
    ("multipart/form-data; boundary=x", "unsupported Content-Type 'multipart/form-data'"),
    ("application/jsonx", "unsupported Content-Type 'application/jsonx'"),
    ("application/json; charset=latin-1", "unsupported charset 'latin-1': JSON bodies must be UTF-8"),
    ("application/json; version=2", "unsupported Content-Type parameter 'version'"),
])
def test_a_body_that_is_not_application_json_is_415(client, content_type, text):
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post("/predict", content=body(), headers=headers)
    assert r.request.headers.get("content-type") == content_type  # the client added none of its own
    assert_error(r, 415, text)
    assert_ok(client)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          'Application/JSON;charset="UTF-8"', "application/json;"])
def test_application_json_with_or_without_a_utf8_charset_is_served(client, reference, content_type):
    x = images(2, seed=5)
    r = client.post("/predict", content=body(x.tolist()), headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    assert_matches(r.json(), reference, x, None)


def test_model_reports_names_and_content_hashes_never_a_path(folder, client):
    m = client.get("/model").json()
    assert m["source"] == folder.name and m["members"] == ["wrn-10-2", "wrn-10-1"]
    files = m["checkpoint"]["files"]
    assert {"weights.safetensors", "plan.json", "config.json", "metrics.json", "anytime.json"} <= set(files)
    for name, d in files.items():
        data = (folder / name).read_bytes()
        assert d == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    digest = hashlib.sha256("".join(f"{n}:{files[n]['sha256']}\n" for n in sorted(files)).encode()).hexdigest()
    assert m["checkpoint"]["sha256"] == digest
    text = json.dumps(m)
    for path in (folder, folder.parent, folder.resolve(), Path.cwd(), Path.home()):
        assert str(path) not in text
    assert '"/' not in text  # no absolute path in any string value
    # however the model was named when started, /model shows only the folder's own name
    other = AnytimeService(load_anytime(folder), SETTINGS, source=str(folder.resolve()))
    assert other.model_info()["source"] == folder.name and str(folder) not in json.dumps(other.model_info())
    assert AnytimeService(load_anytime(folder), SETTINGS, source="runs:/abc123").model_info()["source"] == "runs:/abc123"


def _nan_checkpoint(folder, dest):
    """A copy of the trained checkpoint whose weights.safetensors holds a NaN (as a diverged run would write)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    state = load_file(str(dest / "weights.safetensors"))
    name = sorted(k for k, t in state.items() if t.is_floating_point() and t.numel() > 1)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(dest / "weights.safetensors"))
    return dest, name


def test_a_model_with_non_finite_weights_is_refused_at_load(folder, tmp_path):
    bad, name = _nan_checkpoint(folder, tmp_path / "diverged")
    for load in (lambda: AnytimeService.from_folder(bad, SETTINGS), lambda: check_weights_file(bad)):
        with pytest.raises(SuperweightsError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and str(bad / "weights.safetensors") in msg and f"(first: {name})" in msg
        assert "non-finite values (NaN or infinity) in 1 of" in msg and "cannot be served" in msg
    check_weights_file(folder)  # the original is fine


def test_non_finite_probabilities_are_a_503_logged_once_and_never_a_500(client, service, monkeypatch, caplog):
    """A model that turns NaN at run time (weights finite at load, e.g. overflow): a clear 503, not the 500 of
    serialising NaN; logged once however often it happens; the server recovers."""
    monkeypatch.setattr(service, "nonfinite_outputs", 0)
    name = next(n for n, p in service.predictor.model.named_parameters() if p.ndim == 4)
    weights = [m.get_parameter(name) for m in service.predictor.layout_models.values()]  # every layout's copy
    assert len(weights) == 2 and weights[0] is not weights[1]
    saved = weights[0].detach().clone()
    caplog.set_level(logging.ERROR, logger="superweights.serve")
    try:
        with torch.no_grad():
            for weight in weights:
                weight.fill_(float("nan"))
        for budget in (None, {"ms": 5000}, None):
            r = post(client, images(2), budget)
            assert_error(r, 503, "the model's output for this request is not finite (NaN or infinity")
    finally:
        with torch.no_grad():
            for weight in weights:
                weight.copy_(saved)
    logged = [r for r in caplog.records if "non-finite probabilities" in r.getMessage()]
    assert len(logged) == 1 and "answered 503" in logged[0].getMessage()
    assert client.get("/health").json()["nonfinite_outputs"] == 3
    assert_ok(client)


def test_only_the_request_whose_rows_are_non_finite_fails_in_a_shared_batch(service, monkeypatch):
    """Micro-batched requests are independent rows: a NaN in one request's rows fails that request only."""
    real = service.predictor.predict

    def poisoned(x, **kw):
        pred = real(x, **kw)
        pred.probs[x[:, 0, 0, 0] == 0.5] = float("nan")  # rows marked by the test
        return pred

    monkeypatch.setattr(service.predictor, "predict", poisoned)
    monkeypatch.setattr(service, "nonfinite_outputs", 0)
    good, bad = images(2, seed=1), images(3, seed=2)
    bad[1, 0, 0, 0] = 0.5
    out = service._run_batch(UNLIMITED, [Item(UNLIMITED, good, time.perf_counter(), True, None),
                                         Item(UNLIMITED, bad, time.perf_counter(), True, None)])
    assert isinstance(out[0][0], dict) and len(out[0][0]["predictions"]) == 2
    assert all(math.isfinite(v) for row in out[0][0]["probabilities"] for v in row)
    assert isinstance(out[1][0], ApiError) and out[1][0].status == 503 and service.nonfinite_outputs == 1


# -- concurrency and micro-batching -----------------------------------------------------------------------


async def _concurrent(url, requests):
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        rs = await asyncio.gather(*[c.post("/predict", json={"inputs": x.tolist(), "budget": b})
                                    for x, b in requests])
    return rs


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(folder, reference):
    service = AnytimeService.from_folder(folder, ServeSettings(batch_window_ms=50, max_batch_images=12))
    mid = reference.cumulative_flops[2]
    budgets = [None, {"flops": mid}, {"flops": reference.min_flops}, {"ms": 5000}]
    requests = [(images(1 + i % 3, seed=i), budgets[i % len(budgets)]) for i in range(24)]
    with serve_in_thread(create_app(service)) as url:
        responses = asyncio.run(_concurrent(url, requests))
    outs = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for (x, b), out in zip(requests, outs):
        assert_matches(out, reference, x, None if b and "ms" in b else b)  # 5 s: every step fits
        assert out["batch_images"] <= 12
    assert any(out["batch_images"] > len(x) for (x, _), out in zip(requests, outs))
    assert service.batcher.batches < len(requests)

"""The lean request path of the server (issue 15, server overhead) keeps every contract: the micro-batcher starts
a lone request at once yet still batches a burst, gives up waiting for a request that failed to arrive, works
again on a new event loop; `POST /predict` answered before FastAPI's routing behaves as the route did, under a
root path too; large answers are plain JSON with the predictor's values."""

import asyncio
import json
import time

import httpx
import pytest
import torch

from anytime.batching import MicroBatcher
from anytime.http_app import create_app, route_path
from anytime.predictor import AnytimePredictor
from anytime.serve_service import AnytimeService, ServeSettings
from anytime.store import load_anytime

SHAPE = (1, 8, 8)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(n, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


# -- the micro-batcher ------------------------------------------------------------------------------------


def sizes(key, items):
    return [len(items)] * len(items)


def test_a_burst_submitted_in_one_loop_iteration_shares_one_batch_without_waiting():
    """Nobody is arriving, so nobody waits for the (huge) window; requests submitted in the same loop iteration
    still form one batch (the batch is formed on the next loop pass, not inside the first submit)."""
    calls = []

    def run(key, items):
        calls.append(len(items))
        return sizes(key, items)

    async def main():
        b = MicroBatcher(run, window_ms=60_000, arriving=lambda: 0)
        t = time.perf_counter()
        out = await asyncio.gather(*[b.submit("a", torch.zeros(1, 1), 0.0) for _ in range(3)])
        took = time.perf_counter() - t
        alone = await b.submit("a", torch.zeros(1, 1), 0.0)
        await b.aclose()
        b.close()
        return out, alone, took

    out, alone, took = asyncio.run(main())
    assert out == [3, 3, 3] and alone == 1 and calls == [3, 1]
    assert took < 5.0  # far below the 60 s window


def test_requests_queued_while_a_batch_runs_form_the_next_batch():
    started, release = [], None

    def run(key, items):
        started.append(len(items))
        if len(started) == 1:
            release.wait(10)  # hold the thread until the others are queued
        return sizes(key, items)

    async def main():
        nonlocal release
        import threading

        release = threading.Event()
        b = MicroBatcher(run, window_ms=0.0)
        first = asyncio.ensure_future(b.submit("a", torch.zeros(1, 1), 0.0))
        while not started:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b.submit("a", torch.zeros(1, 1), 0.0)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert b.pending == 4  # one batch at a time: they wait for the thread
        release.set()
        out = [await first] + [await f for f in rest]
        b.close()
        return out

    assert asyncio.run(main()) == [1, 4, 4, 4, 4] and started == [1, 4]


def test_a_request_that_fails_to_arrive_does_not_hold_the_queued_one_for_the_window():
    arriving = [1]

    async def main():
        b = MicroBatcher(sizes, window_ms=60_000, arriving=lambda: arriving[0])
        t = time.perf_counter()
        waiting = asyncio.ensure_future(b.submit("a", torch.zeros(1, 1), 0.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # company is on its way: it waits
        arriving[0] = 0  # ... which turned out malformed (the service nudges after a failed parse)
        b.nudge()
        out = await waiting
        took = time.perf_counter() - t
        b.close()
        return out, took

    out, took = asyncio.run(main())
    assert out == 1 and took < 5.0


def test_the_window_still_closes_when_company_never_comes():
    async def main():
        b = MicroBatcher(sizes, window_ms=30, arriving=lambda: 1)  # "arriving" forever
        t = time.perf_counter()
        out = await b.submit("a", torch.zeros(1, 1), 0.0)
        took = time.perf_counter() - t
        b.close()
        return out, took

    out, took = asyncio.run(main())
    assert out == 1 and 0.025 <= took < 5.0


def test_the_batcher_serves_again_on_a_new_event_loop_and_refuses_after_close():
    b = MicroBatcher(sizes, window_ms=0.0)

    async def once():
        out = await b.submit("a", torch.zeros(2, 1), 0.0)
        await b.aclose()  # app shutdown
        return out

    assert asyncio.run(once()) == 1 and asyncio.run(once()) == 1  # e.g. the app served twice
    assert b.batches == 2 and b.requests == 2
    b.close()

    async def after_close():
        with pytest.raises(RuntimeError, match="closed"):
            await b.submit("a", torch.zeros(1, 1), 0.0)

    asyncio.run(after_close())


def test_a_wrong_number_of_results_fails_the_batch_not_the_batcher():
    async def main():
        b = MicroBatcher(lambda key, items: [] if key == "bad" else sizes(key, items), window_ms=0.0)
        with pytest.raises(RuntimeError, match="0 results for 1 requests"):
            await b.submit("bad", torch.zeros(1, 1), 0.0)
        out = await b.submit("good", torch.zeros(1, 1), 0.0)
        b.close()
        return out

    assert asyncio.run(main()) == 1


# -- POST /predict before FastAPI's routing ---------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(exits_ckpt):
    return exits_ckpt[1]


@pytest.fixture(scope="module")
def service(folder):
    return AnytimeService.from_folder(folder, ServeSettings(max_images=64, max_batch_images=64))


def test_route_path_strips_a_root_path_as_starlette_does():
    assert route_path({"path": "/predict"}) == "/predict"
    assert route_path({"path": "/api/predict", "root_path": "/api"}) == "/predict"
    assert route_path({"path": "/predict", "root_path": "/api"}) == "/predict"  # a proxy already stripped it
    assert route_path({"path": "/apipredict", "root_path": "/api"}) == "/apipredict"


async def _asgi(app, calls, root_path=""):
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return [await c.request(method, path, **kw) for method, path, kw in calls]


def test_the_fast_path_answers_as_the_route_did_under_a_root_path_too(service, folder):
    ref = AnytimePredictor.from_checkpoint(load_anytime(folder))
    x = images(3, seed=4)
    good = {"json": {"inputs": x.tolist(), "budget": None}}
    bad = {"content": b"{", "headers": {"content-type": "application/json"}}
    app = create_app(service)
    for root in ("", "/api"):
        ok, malformed, wrong_type, get, nowhere = asyncio.run(_asgi(app, [
            ("POST", f"{root}/predict", good), ("POST", f"{root}/predict", bad),
            ("POST", f"{root}/predict", {"content": b"{}", "headers": {"content-type": "text/plain"}}),
            ("GET", f"{root}/predict", {}), ("POST", f"{root}/nowhere", good)], root_path=root))
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
        out = ok.json()
        assert out["steps"] == [list(s) for s in ref.steps] and out["predictions"] == ref.predict(x).probs.argmax(-1).tolist()
        assert malformed.status_code == 400 and malformed.json()["detail"].startswith("malformed JSON")
        assert wrong_type.status_code == 415 and "text/plain" in wrong_type.json()["detail"]
        assert get.status_code == 405 and get.json() == {"detail": "Method Not Allowed"}  # FastAPI's router
        assert nowhere.status_code == 404 and nowhere.json() == {"detail": "Not Found"}


def test_post_predict_never_enters_fastapis_middleware_stack(service):
    """What makes the path lean: Starlette builds its middleware stack on the first request it routes, and a
    POST /predict never gets there."""
    app = create_app(service)
    rs = asyncio.run(_asgi(app, [("POST", "/predict", {"json": {"inputs": images(1).tolist(), "budget": None}}),
                                 ("POST", "/predict", {"content": b"[]", "headers": {"content-type": "application/json"}})]))
    assert [r.status_code for r in rs] == [200, 422] and app.middleware_stack is None
    asyncio.run(_asgi(app, [("GET", "/health", {})]))
    assert app.middleware_stack is not None  # every other path goes through FastAPI


def test_a_large_answer_is_plain_json_with_the_predictors_values(service, folder):
    """64 images: the orjson body parses with the standard json module to the predictor's numbers."""
    ref = AnytimePredictor.from_checkpoint(load_anytime(folder))
    x = images(64, seed=8)
    r, = asyncio.run(_asgi(create_app(service), [("POST", "/predict", {"json": {"inputs": x.tolist(),
                                                                                    "budget": None}})]))
    assert r.status_code == 200, r.text
    out = json.loads(r.content)
    assert int(r.headers["content-length"]) == len(r.content)
    expected = ref.predict(x).probs
    torch.testing.assert_close(torch.tensor(out["probabilities"]), expected, atol=1e-6, rtol=0)
    assert out["predictions"] == expected.argmax(-1).tolist() and out["batch_images"] == 64

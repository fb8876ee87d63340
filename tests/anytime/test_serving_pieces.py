"""Pieces of the anytime server and of anytime/ without HTTP: the micro-batcher, the serving predictor, the
settings, the typed budget, the one request schema, the combiner, the schedules and the anytime record."""

import asyncio
import json
import math
import time

import pytest
import torch

from anytime.batching import MicroBatcher, QueueFull
from anytime.budget import KINDS, UNLIMITED, Budget, DeadlineBudget, FlopsBudget, budget_of
from anytime.combine import LatestExits, combine
from anytime.http_app import create_app
from anytime.predictor import AnytimePredictor
from anytime.record import ANYTIME_FILE, anytime_record
from anytime.schedule import SCHEDULERS
from anytime.serve_schemas import ApiError, PredictRequest, parse_request
from anytime.serve_service import ServeSettings
from anytime.serving_predictor import LAYOUTS, ServingPredictor
from anytime.store import load_anytime
from core.errors import SuperweightsError
from ensemble import metrics
from ensemble.config import SCHEDULES, load_config
from ensemble.data import load_data
from ensemble.methods import build_ensemble

from .conftest import DIGITS

SHAPE = (1, 8, 8)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py, as `serve --threads 1`


def images(n, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


# -- micro-batching ---------------------------------------------------------------------------------------


def test_batcher_groups_by_key_caps_images_and_survives_errors():
    calls = []

    def run(key, items):
        calls.append((key, [len(it.x) for it in items]))
        if key == "bad":
            raise ValueError("bad batch")
        return [(key, len(it.x)) for it in items]

    async def main():
        b = MicroBatcher(run, window_ms=30, max_images=5, max_pending=100)
        jobs = [b.submit(k, torch.zeros(n, 1), 0.0) for k, n in
                [("a", 2), ("b", 1), ("a", 2), ("a", 2), ("bad", 1), ("b", 3), ("c", 9)]]
        out = await asyncio.gather(*jobs, return_exceptions=True)
        late = await b.submit("a", torch.zeros(1, 1), 0.0, wait=False)
        await b.aclose()
        b.close()
        return out, late

    out, late = asyncio.run(main())
    assert out[:4] == [("a", 2), ("b", 1), ("a", 2), ("a", 2)] and out[5:] == [("b", 3), ("c", 9)]
    assert isinstance(out[4], ValueError) and late == ("a", 1)
    assert calls[0] == ("a", [2, 2])  # capped at 5 images: the third "a" goes in a later batch
    assert ("b", [1, 3]) in calls and ("c", [9]) in calls  # a single large request runs alone
    assert all(sum(n) <= 5 for k, n in calls if k != "c")


def test_batcher_waits_for_company_only_while_some_is_arriving():
    arriving = [0]

    async def main():
        b = MicroBatcher(lambda k, items: [len(items)] * len(items), window_ms=2000, arriving=lambda: arriving[0])
        t = time.perf_counter()
        alone = await b.submit("a", torch.zeros(1, 1), 0.0)
        waited_alone = time.perf_counter() - t
        arriving[0] = 1  # a second request is being parsed: the first one waits for it
        first = asyncio.ensure_future(b.submit("a", torch.zeros(1, 1), 0.0))
        await asyncio.sleep(0.05)
        arriving[0] = 0  # ... and submits (the service decrements before submitting)
        t = time.perf_counter()
        second = await b.submit("a", torch.zeros(1, 1), 0.0)
        together = await first
        assert time.perf_counter() - t < 1.0  # no waiting for the rest of the window
        await b.aclose()
        b.close()
        return alone, waited_alone, together, second

    alone, waited_alone, together, second = asyncio.run(main())
    assert alone == 1 and waited_alone < 1.0
    assert together == second == 2


def test_batcher_refuses_beyond_max_pending():
    async def main():
        b = MicroBatcher(lambda k, items: [None] * len(items), window_ms=1000, max_pending=2)
        first = [asyncio.ensure_future(b.submit("a", torch.zeros(1, 1), 0.0)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit("a", torch.zeros(1, 1), 0.0)
        await b.aclose()
        for f in first:
            f.cancel()
        b.close()

    asyncio.run(main())


# -- pieces -----------------------------------------------------------------------------------------------


def test_serving_predictor_times_batches_by_bucket(exits_ckpt):
    ckpt = load_anytime(exits_ckpt[1])
    p = ServingPredictor(ckpt.model, ckpt.record, safety=1.5)
    assert [p.bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]
    times = p.calibrate(torch.rand(3, *SHAPE))
    base = p._times[((4, *SHAPE), torch.float32, "cpu")]
    assert times == [t * 1.5 for t in base] and len(times) == len(p.steps)
    x = images(3)
    ref = AnytimePredictor(ckpt.model, ckpt.record)
    ref.model.to(memory_format=LAYOUTS[p.format_for(3)])  # the layout measured faster for bucket 4
    want = ref.predict(x, budget_flops=p.cumulative_flops[1])
    got = p.predict(x, budget_flops=p.cumulative_flops[1])
    assert got.steps == want.steps and torch.equal(got.probs, want.probs)


def conv_weights(model):
    return [p for p in model.parameters() if p.ndim == 4]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_fixed_memory_format_holds_the_conv_weights_once_in_that_layout(exits_ckpt, layout):
    """Whatever layout the checkpoint's weights come in (a channels_last bank materialises channels_last):
    one copy, in the layout asked for; predictions equal a plain predictor's of that layout bit for bit."""
    ckpt = load_anytime(exits_ckpt[1])
    other = "contiguous" if layout == "channels_last" else "channels_last"
    model = ckpt.model.materialize().to(memory_format=LAYOUTS[other])
    p = ServingPredictor(model, ckpt.record, memory_format=layout)
    assert list(p.layout_models) == [layout] and p.layout_models[layout] is p.model
    weights = conv_weights(p.model)
    assert weights and all(w.is_contiguous(memory_format=LAYOUTS[layout]) for w in weights)
    assert any(not w.is_contiguous(memory_format=LAYOUTS[other]) for w in weights)  # a real conversion
    x = images(5, seed=3)
    assert p.calibrate(x) and p.formats == {8: layout} and p.format_for(5) == p.format_for(300) == layout
    ref = AnytimePredictor(ckpt.model, ckpt.record)
    ref.model.to(memory_format=LAYOUTS[layout])
    assert torch.equal(p.predict(x).probs, ref.predict(x).probs)


class Slowed:
    """A step-wise member whose every step first sleeps `ms` (a layout made slow for real)."""

    def __init__(self, member, ms):
        self.member, self.ms = member, ms

    def advance(self, h, k):
        time.sleep(self.ms / 1e3)
        return self.member.advance(h, k)


@pytest.mark.parametrize("slow", ["contiguous", "channels_last"])
def test_auto_runs_each_bucket_in_the_layout_measured_faster(exits_ckpt, slow):
    ckpt = load_anytime(exits_ckpt[1])
    p = ServingPredictor(ckpt.model, ckpt.record, safety=1.0)
    assert list(p.layout_models) == ["contiguous", "channels_last"] and p.memory_format == "auto"
    a, b = (conv_weights(p.layout_models[n]) for n in p.layout_models)
    assert all(w.is_contiguous() for w in a) and all(w.is_contiguous(memory_format=torch.channels_last) for w in b)
    assert all(x.data_ptr() != y.data_ptr() and torch.equal(x, y) for x, y in zip(a, b))
    copy = p.layout_models["channels_last"]  # every tensor but the conv weights is held once, shared
    for mine, theirs in ((p.model.named_parameters(), copy.named_parameters()),
                         (p.model.named_buffers(), copy.named_buffers())):
        mine, theirs = dict(mine), dict(theirs)
        assert mine.keys() == theirs.keys() and all(theirs[n] is t for n, t in mine.items() if t.ndim != 4)
    assert p.format_for(1) == "contiguous" and "no batch size measured yet" in p.layout_summary()
    p.layouts[slow] = [Slowed(m, 10.0) for m in p.layouts[slow]]  # 10 ms a step: far above a real one
    fast = "channels_last" if slow == "contiguous" else "contiguous"
    for n in (1, 2, 3):
        times = p.calibrate(images(n))
        assert p.formats[p.bucket(n)] == fast and all(t < 10.0 for t in times)  # the fast layout's times
    assert p.formats == {1: fast, 2: fast, 4: fast} and p.format_for(64) == fast
    assert p.layout_summary() == f"{fast} for 1-4 images"
    assert p.predict(images(2)).elapsed_ms < 10.0 * len(p.steps)  # it runs there too


def test_auto_layout_summary_names_each_range_and_every_layout_predicts_the_same(exits_ckpt):
    ckpt = load_anytime(exits_ckpt[1])
    p = ServingPredictor(ckpt.model, ckpt.record)
    p.formats = {1: "channels_last", 2: "contiguous", 4: "contiguous", 8: "channels_last"}
    assert p.layout_summary() == "channels_last for 1 image, contiguous for 2-4 images, channels_last for 5-8 images"
    p.formats = {2: "contiguous", 8: "channels_last"}  # unmeasured: the nearest below, else above
    assert [p.format_for(n) for n in (1, 3, 4, 100)] == ["contiguous", "contiguous", "contiguous", "channels_last"]
    p.formats = {1: "channels_last", 2: "contiguous", 4: "contiguous", 8: "channels_last"}
    assert [p.format_for(n) for n in (1, 2, 3, 5, 8, 9, 200)] == [
        "channels_last", "contiguous", "contiguous", "channels_last", "channels_last", "channels_last", "channels_last"]
    ref = AnytimePredictor(ckpt.model, ckpt.record)
    for n in (1, 3, 6):  # channels_last, contiguous, channels_last: the same numbers up to float rounding
        x = images(n, seed=n)
        torch.testing.assert_close(p.predict(x).probs, ref.predict(x).probs, atol=1e-6, rtol=0)


def test_a_model_without_convs_holds_one_layout_under_auto():
    info = DIGITS
    config = load_config(None, ['ensemble.members=["mlp-64-2","mlp-32-1"]', 'anytime.schedule="member"'])
    model = build_ensemble(config, info).eval()
    p = ServingPredictor(model, anytime_record(model, config, info))
    assert list(p.layout_models) == ["contiguous"] and not any(t.ndim == 4 for t in p.model.parameters())
    p.calibrate(images(3))
    assert p.formats == {4: "contiguous"} and p.layout_summary() == "contiguous for 1-4 images"


def test_an_unknown_memory_format_is_a_one_line_error(exits_ckpt):
    ckpt = load_anytime(exits_ckpt[1])
    with pytest.raises(SuperweightsError, match="serve memory_format must be one of auto, contiguous, "
                                                "channels_last, got 'nhwc'"):
        ServingPredictor(ckpt.model, ckpt.record, memory_format="nhwc")
    with pytest.raises(SuperweightsError, match="serve.memory_format must be one of auto, contiguous, channels_last"):
        load_config(None, ['serve.memory_format="nchw"'])
    with pytest.raises(SuperweightsError, match="serve setting memory_format must be one of"):
        ServeSettings(memory_format="cl")


def test_serving_predictor_estimates_grow_when_runs_are_slower_than_measured(exits_ckpt):
    ckpt = load_anytime(exits_ckpt[1])
    p = ServingPredictor(ckpt.model, ckpt.record, safety=1.0, window=8)
    x = images(2)
    base = p.calibrate(x)
    assert p.slowdown == 1.0
    for _ in range(8):  # the machine got 3x slower than at start-up
        p.observe(x, len(p.steps), 3 * sum(base))
    assert p.slowdown == pytest.approx(3.0)
    assert p.calibrate(x) == pytest.approx([3 * t for t in base])
    for _ in range(8):  # faster than measured never makes estimates smaller than measured
        p.observe(x, len(p.steps), 0.1 * sum(base))
    assert p.slowdown == 1.0
    p.observe(torch.rand(1000, *SHAPE), 2, 1e6)  # an unmeasured bucket is ignored
    assert p.slowdown == 1.0


@pytest.mark.parametrize("kwargs, text", [
    ({"max_images": 0}, "max_images must be >= 1"),
    ({"batch_window_ms": -1.0}, "batch_window_ms must be a finite number >= 0"),
    ({"deadline_safety": 0.5}, "deadline_safety must be >= 1"),
    ({"input_range": (1.0, 0.0)}, "input_range"),
    ({"device": "tpu"}, "--device must be cpu or cuda, got 'tpu'"),
    ({"device": "cuda:x"}, "--device must be cpu or cuda, got 'cuda:x'"),
])
def test_settings_are_checked(kwargs, text):
    with pytest.raises(SuperweightsError, match=text.replace("(", r"\(")):
        ServeSettings(**kwargs)


# -- the typed budget and the one request schema ----------------------------------------------------------


def test_budgets_are_typed_hashable_values():
    assert budget_of() is UNLIMITED and budget_of(flops=5) == FlopsBudget(5)
    assert budget_of(ms=3) == DeadlineBudget(3) and budget_of(flops=5, ms=3) == DeadlineBudget(3, 5)
    assert (UNLIMITED.max_flops, UNLIMITED.deadline_ms) == (None, None)
    assert (FlopsBudget(5).max_flops, FlopsBudget(5).deadline_ms) == (5, None)
    assert (DeadlineBudget(3, 5).max_flops, DeadlineBudget(3, 5).deadline_ms) == (5, 3)
    # batch keys: equal budgets group, a FLOPs budget never groups with a deadline of the same number
    assert len({FlopsBudget(5.0), FlopsBudget(5.0), DeadlineBudget(5.0), Budget()}) == 3
    assert DeadlineBudget(10.0).after(4.0) == DeadlineBudget(6.0) and FlopsBudget(5).after(4.0) == FlopsBudget(5)
    assert set(KINDS) == {"flops", "ms", "mean_flops", "confidence"} and KINDS["ms"] is DeadlineBudget
    assert FlopsBudget.requested(1e6) == FlopsBudget(1e6)
    with pytest.raises(SuperweightsError, match=r"budget.ms must be > 0 milliseconds, got -1"):
        DeadlineBudget.requested(-1.0)


def test_a_request_is_parsed_once_into_inputs_and_a_typed_budget():
    x = images(2)
    for budget, expected in [(None, UNLIMITED), ({"flops": 1e6}, FlopsBudget(1e6)), ({"ms": 5}, DeadlineBudget(5.0))]:
        body = json.dumps({"inputs": x.tolist(), "budget": budget}).encode()
        got_x, got = parse_request(body, SHAPE, 16, (0.0, 1.0))
        assert got == expected and type(got) is type(expected)
        torch.testing.assert_close(got_x, x)
    with pytest.raises(ApiError, match="exactly one"):
        parse_request(json.dumps({"inputs": x.tolist(), "budget": {}}).encode(), SHAPE, 16, None)
    # the schema checks before the inputs, the inputs before the budget
    bad_both = json.dumps({"inputs": images(1).expand(1, 3, 8, 8).tolist(), "budget": {"flops": 0}}).encode()
    with pytest.raises(ApiError, match=r"got \(1, 3, 8, 8\)"):
        parse_request(bad_both, SHAPE, 16, None)


def test_the_openapi_page_documents_the_schema_that_validates():
    spec = create_app(object()).openapi()  # the page needs no model
    schemas = spec["components"]["schemas"]
    own = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    own_defs = own.pop("$defs")
    assert schemas["PredictRequest"] == own and all(schemas[k] == v for k, v in own_defs.items())
    kinds = schemas["BudgetBody"]["oneOf"]
    assert [k["required"] for k in kinds] == [[key] for key in KINDS]
    assert all(k["additionalProperties"] is False for k in kinds)
    ranges = {k["required"][0]: {r: v for r, v in k["properties"][k["required"][0]].items() if "imum" in r}
              for k in kinds}
    assert ranges == {"flops": {"exclusiveMinimum": 0}, "ms": {"exclusiveMinimum": 0},
                      "mean_flops": {"exclusiveMinimum": 0}, "confidence": {"minimum": 0, "maximum": 1}}


def test_predictor_takes_a_typed_budget_or_the_keyword_shortcuts(exits_ckpt):
    p = AnytimePredictor.from_checkpoint(load_anytime(exits_ckpt[1]))
    x = images(3)
    mid = p.cumulative_flops[2]
    for kw, budget in [({}, UNLIMITED), ({"budget_flops": mid}, FlopsBudget(mid)),
                       ({"deadline_ms": 60_000, "budget_flops": mid}, DeadlineBudget(60_000, mid))]:
        a, b = p.predict(x, **kw), p.predict(x, budget=budget)
        assert a.steps == b.steps and a.flops == b.flops and torch.equal(a.probs, b.probs)
    assert len(p.predict(x, budget=DeadlineBudget(60_000, mid)).steps) == 3
    with pytest.raises(TypeError, match="not both"):
        p.predict(x, budget_flops=mid, budget=FlopsBudget(mid))


# -- combiner, schedules, record --------------------------------------------------------------------------


def test_one_combiner_for_training_metrics_predictor_and_evaluator():
    assert combine is metrics.combine
    a, b = torch.rand(4, 3).softmax(-1), torch.rand(4, 3).softmax(-1)
    latest = LatestExits()
    latest.update(1, a)
    trial = latest.with_exit(0, b)
    assert len(latest) == 1 and len(trial) == 2  # a tried step leaves the running prefix alone
    torch.testing.assert_close(trial.probs(), (a + b) / 2)
    assert trial.stacked().shape == (4, 2, 3)


def test_every_configurable_schedule_has_a_scheduler():
    assert tuple(SCHEDULERS) == SCHEDULES


def test_the_training_pipeline_writes_the_record_anytime_record_computes(exits_ckpt):
    """The fixture's checkpoint got anytime.json from `finish_checkpoint` (the pipeline's last step); the record
    recomputed from the saved checkpoint is the same."""
    folder = exits_ckpt[1]
    written = json.loads((folder / ANYTIME_FILE).read_text())
    ckpt = load_anytime(folder)
    t = ckpt.config.train
    val = load_data(ckpt.config.data, t.seed, t.batch_size, t.eval_batch_size).val
    assert anytime_record(ckpt.model, ckpt.config, ckpt.info, val) == written
    assert written["schedule"]["cumulative_flops"] == AnytimePredictor(ckpt.model, written).cumulative_flops
    assert math.isclose(sum(written["step_flops"][0]), written["member_flops"][0])

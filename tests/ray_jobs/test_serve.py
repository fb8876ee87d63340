"""`superweights serve`: the CLI as a user runs it (subprocess, real port, real HTTP), MLflow model URIs, and
Ray Serve answering exactly as uvicorn does (local testing mode; a real local Ray cluster is marked slow)."""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from anytime.http_app import create_app
from anytime.predictor import AnytimePredictor
from anytime.record import finish_checkpoint
from anytime.serve_schemas import ApiError
from anytime.serve_service import AnytimeService, ServeSettings
from anytime.serve_thread import serve_in_thread
from anytime.store import load_anytime
from core.errors import SuperweightsError
from ensemble.config import load_config
from ensemble.loop import fit
from ray_jobs.model_uri import resolved_model
from ray_jobs.serve import deployment

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ['ensemble.members=["wrn-10-2","wrn-10-1"]', 'ensemble.exits="all"', "train.epochs=1",
          "data.train_per_class=10"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py, as `serve --threads 1`


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-ckpt")
    fit(load_config(None, CONFIG), out_dir=out, progress=False, log=lambda s: None, finish=finish_checkpoint)
    return out


@pytest.fixture(scope="module")
def reference(ckpt):
    return AnytimePredictor.from_checkpoint(load_anytime(ckpt))


@pytest.fixture(scope="module")
def uvicorn_url(ckpt):
    with serve_in_thread(create_app(AnytimeService.from_folder(ckpt))) as url:
        yield url


def payload(n=3, budget=None, seed=0):
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return {"inputs": x.tolist(), "budget": budget}


def cli(*args):
    return [sys.executable, "-m", "ray_jobs.cli", "serve", *args]


def one_line_error(p, text):
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr
    assert lines[-1].startswith("superweights: error: ") and text in lines[-1], p.stderr
    return lines[-1]


def same_answer(a: dict, b: dict):
    assert a["steps"] == b["steps"] and a["flops"] == b["flops"] and a["predictions"] == b["predictions"]
    assert a["image_steps"] == b["image_steps"] and a["image_flops"] == b["image_flops"]
    torch.testing.assert_close(torch.tensor(a["probabilities"]), torch.tensor(b["probabilities"]), atol=1e-5, rtol=0)


# -- the CLI ----------------------------------------------------------------------------------------------


def test_cli_serves_a_checkpoint_and_stops_on_sigterm(ckpt, reference):
    proc = subprocess.Popen(cli(str(ckpt), "--port", "0"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT ..." once the model is loaded
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        layouts = proc.stdout.readline()  # which conv-weight layout runs which batch sizes (auto: measured)
        with httpx.Client(base_url=m.group(1), timeout=20) as c:
            for _ in range(100):
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            fmt = c.get("/model").json()["memory_format"]
            assert fmt["setting"] == "auto" and list(fmt["by_batch_size"]) == ["1", "2", "4", "8", "16", "32", "64"]
            assert set(fmt["by_batch_size"].values()) <= {"contiguous", "channels_last"}
            assert re.fullmatch(r"conv weights: ((contiguous|channels_last) for [\d-]+ images?(, )?)+ "
                                r"\(measured at start-up\)\n", layouts), layouts
            assert f"{fmt['by_batch_size']['1']} for 1" in layouts and f"{fmt['by_batch_size']['64']} for " in layouts
            budget = reference.cumulative_flops[2]
            r = c.post("/predict", json=payload(2, {"flops": budget}))
            assert r.status_code == 200, r.text
            ref = reference.predict(torch.tensor(payload(2)["inputs"]), budget_flops=budget)
            assert r.json()["steps"] == [list(s) for s in ref.steps]
            assert r.json()["predictions"] == ref.probs.argmax(-1).tolist()
            from anytime.budget import ConfidenceBudget, MeanFlopsBudget

            x8 = torch.tensor(payload(8, seed=4)["inputs"])
            mean = (reference.cumulative_flops[0] + reference.cumulative_flops[-1]) / 2
            for body, kind in (({"mean_flops": mean}, MeanFlopsBudget(mean)), ({"confidence": 0.8}, ConfidenceBudget(0.8))):
                r = c.post("/predict", json=payload(8, body, seed=4))  # per-input early exit (issue 15)
                assert r.status_code == 200, r.text
                ref = reference.predict(x8, budget=kind)
                assert r.json()["image_steps"] == ref.image_steps and r.json()["image_flops"] == ref.image_flops
                assert r.json()["predictions"] == ref.probs.argmax(-1).tolist()
            bad = c.post("/predict", json=payload(1, {"confidence": 2}))
            assert bad.status_code == 422 and "budget.confidence must be a number in [0, 1]" in bad.json()["detail"]
            bad = c.post("/predict", content=b"{nope", headers={"content-type": "application/json"})
            assert bad.status_code == 400 and "Traceback" not in bad.text
            plain = c.post("/predict", content=json.dumps(payload(1)), headers={"content-type": "text/plain"})
            assert plain.status_code == 415 and plain.json()["detail"].startswith("unsupported Content-Type")
            assert c.post("/predict", json=payload(1)).status_code == 200
        proc.send_signal(signal.SIGTERM)  # graceful stop, exit 0 (^C behaves the same)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("args, text", [
    (["{tmp}/nowhere"], "is neither a checkpoint folder nor a storage or MLflow URI"),
    (["ftp://host/model"], "model 'ftp://host/model' is not a storage URI pyarrow can open"),
    (["file://{tmp}/nowhere"], "no model at file://{tmp}/nowhere: weights.safetensors, plan.json, config.json, "
                                "metrics.json missing"),
    (["runs:/0123456789abcdef", "--tracking-uri", "sqlite:///{tmp}/none.db"], "no MLflow store at"),
    (["models:/just-a-name", "--tracking-uri", "sqlite:///{tmp}/none.db"], "malformed model URI"),
    (["runs:/", "--tracking-uri", "sqlite:///{tmp}/none.db"], "malformed run URI"),
    (["{ckpt}", "--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
    (["{ckpt}", "--max-body-mb", "0"], "--max-body-mb must be > 0"),
    (["{ckpt}", "--max-images", "0"], "serve setting max_images must be >= 1"),
    (["{ckpt}", "--device", "tpu"], "--device must be cpu or cuda"),
    (["{ckpt}", "--device", "cuda:x"], "--device must be cpu or cuda, got 'cuda:x': use cpu, cuda or cuda:N"),
    (["{ckpt}", "--device", "cuda:-1"], "--device must be cpu or cuda, got 'cuda:-1'"),
    (["{ckpt}", "--ray", "--port", "0"], "--ray needs a fixed --port"),
])
def test_start_up_errors_are_one_line_exit_2(ckpt, tmp_path, capsys, args, text):
    """In-process `main` (the subprocess path is shown with an unknown MLflow run below)."""
    from ray_jobs.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"tmp": tmp_path, "ckpt": ckpt, "busy": busy.getsockname()[1]}
        code = main(["serve", *(a.format(**fill) for a in args)])
    err = capsys.readouterr().err
    one_line_error(subprocess.CompletedProcess(args, code, "", err), text.format(**fill))


def test_cli_refuses_a_checkpoint_with_nan_weights(ckpt, tmp_path):
    """A diverged run's weights (NaN written into a trained checkpoint's safetensors): one line, exit 2, before
    the server listens; `/model` and `/predict` never get to answer NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "diverged"
    shutil.copytree(ckpt, bad)
    state = load_file(str(bad / "weights.safetensors"))
    for name in [k for k, t in state.items() if t.is_floating_point()][::3]:
        state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(bad / "weights.safetensors"))
    p = subprocess.run(cli(str(bad), "--port", "0"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_line_error(p, f"{bad / 'weights.safetensors'} holds non-finite values (NaN or infinity)")
    assert "cannot be served" in line and "train.lr" in line and len(p.stderr.strip().splitlines()) == 1
    assert "serving" not in p.stdout

    # `evaluate` refuses it the same way, instead of writing curves of NaN
    ev = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "evaluate", str(bad), "--out",
                         str(tmp_path / "ev")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_line_error(ev, f"{bad / 'weights.safetensors'} holds non-finite values (NaN or infinity)")
    assert "cannot be served or evaluated" in line and len(ev.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists()


# -- MLflow URIs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(ckpt, mlflow_uri):
    """The session's SQLite MLflow store (conftest) with a run holding the checkpoint (as `train` logs it) and
    a registered version of it with an alias."""
    from mlflow import MlflowClient

    from ray_jobs.tracking import RunLogger, start_run

    run_id = start_run(mlflow_uri, experiment="serve-test", run_name="serve", params={}, tags={})
    RunLogger(mlflow_uri, run_id).log_artifacts(ckpt, tuple(p.name for p in Path(ckpt).iterdir() if p.is_file()))
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    client.create_registered_model("digits-anytime")
    client.create_model_version("digits-anytime", source=f"runs:/{run_id}/checkpoint", run_id=run_id)
    client.set_registered_model_alias("digits-anytime", "prod", "1")
    return mlflow_uri, run_id


def test_mlflow_uris_resolve_to_the_checkpoint(registry, ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own models:/ download would create ./mlflow.db: it must not be used
    uri, run_id = registry
    expected = {p.name: p.read_bytes() for p in Path(ckpt).iterdir() if p.is_file()}
    for model in (f"runs:/{run_id}", f"runs:/{run_id}/checkpoint", "models:/digits-anytime/1",
                  "models:/digits-anytime/latest", "models:/digits-anytime@prod"):
        with resolved_model(model, uri) as folder:
            got = {p.name: p.read_bytes() for p in folder.iterdir()}
            assert got == expected, model
        assert not folder.exists()  # the download lives only while the model loads
    assert list(tmp_path.iterdir()) == []


def test_storage_uris_resolve_to_the_model_files(ckpt, tmp_path):
    """A model folder on storage (what `--out` / `ray.storage_path` accept: s3://, gs://, file://): its model files
    are fetched, nothing else (a checkpoint folder's optimizer state stays where it is)."""
    folder = tmp_path / "on-storage"
    shutil.copytree(ckpt, folder)
    (folder / "optimizer.safetensors").write_bytes(b"not fetched")
    model_files = ("weights.safetensors", "plan.json", "config.json", "metrics.json", "anytime.json")
    expected = {name: (folder / name).read_bytes() for name in model_files}
    assert len([p for p in folder.iterdir() if p.is_file()]) > len(model_files)  # others are there, not fetched
    with resolved_model(f"file://{folder}") as got:
        assert got != folder and {p.name: p.read_bytes() for p in got.iterdir()} == expected
    assert not got.exists()


def test_serve_loads_a_model_on_storage(ckpt, reference):
    """What `superweights serve file:///...` (or s3://...) loads, before the server listens and in each replica."""
    from ray_jobs.serve import load_service

    service = load_service(f"file://{ckpt}", None, ServeSettings(memory_format="contiguous"))
    assert service.predictor.steps == reference.steps
    same = AnytimePredictor.from_checkpoint(load_anytime(ckpt))
    same.model.to(memory_format=torch.contiguous_format)  # the layout asked for: then bit for bit the same numbers
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(service.predictor.predict(x).probs, same.predict(x).probs, atol=0, rtol=0)


@pytest.mark.parametrize("model, text", [
    ("runs:/0123456789abcdef", "Run with id=0123456789abcdef not found"),
    ("models:/no-such-model/1", "no-such-model"),
    ("models:/digits-anytime/7", "version=7"),
    ("models:/digits-anytime@nope", "alias nope"),
])
def test_unknown_mlflow_uris_are_one_line_errors(registry, model, text):
    with pytest.raises(SuperweightsError, match="cannot download model") as e:
        with resolved_model(model, registry[0]):
            pass
    assert text in str(e.value) and "\n" not in str(e.value)


def test_cli_serves_a_registered_model_and_refuses_an_unknown_one(registry, reference):
    uri = registry[0]
    bad = subprocess.run(cli("runs:/feedfacefeedface", "--tracking-uri", uri), cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    one_line_error(bad, "cannot download model runs:/feedfacefeedface")
    from ray_jobs.serve import load_service

    service = load_service("models:/digits-anytime@prod", uri, ServeSettings())
    assert service.model_info()["source"] == "models:/digits-anytime@prod"
    assert service.predictor.steps == reference.steps


# -- Ray Serve --------------------------------------------------------------------------------------------


def test_ray_serve_local_testing_mode_answers_as_uvicorn(ckpt, uvicorn_url, reference):
    from ray import serve

    handle = serve.run(deployment(str(ckpt)), name="local-test",
                       _local_testing_mode=True)
    with httpx.Client(base_url=uvicorn_url, timeout=20) as c:
        for budget in (None, {"flops": reference.cumulative_flops[1]}, {"flops": reference.cumulative_flops[3]},
                       {"confidence": 0.8}, {"mean_flops": reference.cumulative_flops[2]}):
            body = payload(6, budget, seed=7)
            same_answer(handle.predict.remote(body).result(), c.post("/predict", json=body).json())
        bad = payload(1, {"flops": 1})
        with pytest.raises(ApiError) as e:
            handle.predict.remote(bad).result()
        assert e.value.status == 422 and e.value.message == c.post("/predict", json=bad).json()["detail"]
        assert untimed(handle.model_info.remote().result()) == untimed(c.get("/model").json())


def test_ray_cli_app_builder(ckpt):
    """`serve run ray_jobs.serve:build_app model=... key=value`: string arguments, checked one-line errors."""
    from ray import serve

    from ray_jobs.serve import build_app

    handle = serve.run(build_app({"model": str(ckpt), "replicas": "1", "max_images": "2", "batch_window_ms": "0",
                                  "input_range": "null", "memory_format": "channels_last", "max_batch_images": "4"}),
                       name="builder-test", _local_testing_mode=True)
    info = handle.model_info.remote().result()
    assert info["limits"]["max_images"] == 2 and info["input_range"] is None
    assert info["memory_format"]["setting"] == "channels_last"
    assert info["memory_format"]["by_batch_size"] == {"1": "channels_last", "2": "channels_last", "4": "channels_last"}
    with pytest.raises(ApiError, match="limit is 2"):
        handle.predict.remote(payload(3)).result()
    with pytest.raises(SuperweightsError, match="unknown build_app arguments"):
        build_app({"model": str(ckpt), "replica": "2"})
    with pytest.raises(SuperweightsError, match="needs model="):
        build_app({})


def untimed(info: dict) -> dict:
    """/model without the measured (machine-dependent) parts."""
    return {**info, "budget": info["budget"]["flops"], "memory_format": info["memory_format"]["setting"],
            "schedule": [{k: v for k, v in s.items() if k != "estimated_ms"} for s in info["schedule"]]}


@pytest.mark.slow
def test_ray_serve_http_answers_as_uvicorn(ckpt, uvicorn_url, reference, ray_connected):
    """The session's local Ray cluster (conftest) with the Serve HTTP proxy on a free loopback port."""
    from ray import serve

    from .conftest import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(deployment(str(ckpt), replicas=1, max_ongoing_requests=8), name="anytime", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as ray_c, \
                httpx.Client(base_url=uvicorn_url, timeout=30) as uv_c:
            assert ray_c.get("/health").json()["status"] == "ok"
            for budget in (None, {"flops": reference.cumulative_flops[2]}):
                body = payload(2, budget, seed=3)
                a, b = ray_c.post("/predict", json=body), uv_c.post("/predict", json=body)
                assert a.status_code == b.status_code == 200
                same_answer(a.json(), b.json())
            for data in (b"{bad", json.dumps(payload(1, {"ms": -1})).encode(),
                         json.dumps(payload(1, {"flops": 1})).encode()):
                a = ray_c.post("/predict", content=data, headers={"content-type": "application/json"})
                b = uv_c.post("/predict", content=data, headers={"content-type": "application/json"})
                assert (a.status_code, a.json()) == (b.status_code, b.json())
            assert ray_c.post("/predict", json=payload(1)).status_code == 200  # still serving
            timed = ray_c.post("/predict", json=payload(1, {"ms": 500})).json()
            assert timed["deadline_met"] is True
            assert ray_c.get("/openapi.json").json()["paths"].keys() == uv_c.get("/openapi.json").json()["paths"].keys()
    finally:
        serve.shutdown()

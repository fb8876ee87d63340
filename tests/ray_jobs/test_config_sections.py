"""One Config: the `[ray]` and `[serve]` sections in TOML, `--set`, and the flags on top (flag > --set > TOML >
default); runtime sections never make a resume refuse, and a config.json written before they existed loads."""

from __future__ import annotations

import json

import pytest

from core.errors import SuperweightsError
from ensemble.config import RUNTIME_SECTIONS, Config, config_from_json, load_config
from ray_jobs import cli
from ray_jobs import driver as driver_module
from ray_jobs import serve as serve_module

from .conftest import TWO_MEMBERS

TINY = ["data.train_per_class=10", TWO_MEMBERS, "train.batch_size=50"]


@pytest.fixture
def toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[ray]\nworkers = 0\ncheckpoint_every = 3\nstorage_path = "from-toml"\n\n'
                    '[serve]\nhost = "127.0.0.2"\nport = 9123\nmax_images = 7\ninput_range = []\nthreads = 2\n')
    return path


class Started(Exception):
    pass


def _train_sees(monkeypatch, argv: list[str]):
    """What `superweights train ...` hands the driver (config, options), without training."""
    def fake_train(config, options, **kw):
        raise Started(config, options)

    monkeypatch.setattr(driver_module, "train", fake_train)
    with pytest.raises(Started) as e:
        cli.main(["train", "--no-tracking", *argv])
    return e.value.args


def test_train_reads_ray_from_toml_then_set_then_flags(toml, tmp_path, monkeypatch):
    config, options = _train_sees(monkeypatch, ["-c", str(toml)])
    assert (options.workers, options.checkpoint_every, options.storage_path) == (0, 3, "from-toml")
    assert config.ray.workers == 0  # the config saved with the checkpoint says what ran
    _, options = _train_sees(monkeypatch, ["-c", str(toml), "--set", "ray.checkpoint_every=5"])
    assert options.checkpoint_every == 5
    _, options = _train_sees(monkeypatch, ["-c", str(toml), "--set", "ray.checkpoint_every=5",
                                           "--checkpoint-every", "7", "--workers", "2"])
    assert (options.checkpoint_every, options.workers, options.storage_path) == (7, 2, "from-toml")
    config, options = _train_sees(monkeypatch, [])
    assert options == driver_module.RayOptions() and config.ray == Config().ray


def _listens_on(monkeypatch, argv: list[str]):
    """Where `superweights serve ...` would listen, and with which settings (stops before loading the model)."""
    seen = {}

    def fake_listen(host, port):
        raise Started(host, port)

    monkeypatch.setattr(serve_module, "_listen", fake_listen)  # called first, before the model is loaded
    original = serve_module.run_uvicorn

    def spy(args, settings, log=print, serve_config=None):
        seen["settings"], seen["serve"] = settings, serve_config
        return original(args, settings, log, serve_config)

    monkeypatch.setattr(serve_module, "run_uvicorn", spy)
    with pytest.raises(Started) as e:
        cli.main(["serve", "some-model", *argv])
    return e.value.args, seen


def test_serve_reads_serve_from_toml_then_set_then_flags(toml, monkeypatch):
    where, seen = _listens_on(monkeypatch, ["-c", str(toml)])
    assert where == ("127.0.0.2", 9123)
    assert seen["settings"].max_images == 7 and seen["settings"].input_range is None
    assert seen["serve"].threads == 2
    where, _ = _listens_on(monkeypatch, ["-c", str(toml), "--set", "serve.port=9200"])
    assert where == ("127.0.0.2", 9200)
    where, seen = _listens_on(monkeypatch, ["-c", str(toml), "--set", "serve.port=9200", "--port", "9300",
                                            "--host", "127.0.0.3", "--max-images", "9"])
    assert where == ("127.0.0.3", 9300) and seen["settings"].max_images == 9
    assert seen["settings"].memory_format == "auto"
    _, seen = _listens_on(monkeypatch, ["-c", str(toml), "--set", 'serve.memory_format="contiguous"'])
    assert seen["settings"].memory_format == "contiguous"
    _, seen = _listens_on(monkeypatch, ["--set", 'serve.memory_format="contiguous"', "--memory-format", "channels_last"])
    assert seen["settings"].memory_format == seen["serve"].memory_format == "channels_last"
    where, seen = _listens_on(monkeypatch, [])
    assert where == ("127.0.0.1", 8000) and seen["settings"].input_range == (0.0, 1.0)
    assert seen["settings"] == serve_module.settings_from_args(cli.build_parser().parse_args(["serve", "m"]))


@pytest.mark.parametrize("command", [["train", "--no-tracking"], ["serve", "some-model"]])
@pytest.mark.parametrize("body, text", [
    ("[ray]\nworker = 2\n", "unknown config key ray.worker; valid keys: "),
    ("[serve]\nprot = 1\n", "unknown config key serve.prot; valid keys: "),
    ("[serve]\nport = 70000\n", "serve.port must be in [0, 65535], got 70000"),
    ("[serve]\nmemory_format = \"nhwc\"\n", "serve.memory_format must be one of auto, contiguous, channels_last, "
                                           "got 'nhwc'"),
    ("[ray]\nworkers = \"two\"\n", "ray.workers must be an integer, got 'two'"),
])
def test_a_bad_ray_or_serve_key_is_one_line_exit_2(tmp_path, capsys, command, body, text):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    code = cli.main([*command, "-c", str(path)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"superweights: error: {text}"), err


def test_a_config_json_without_runtime_sections_loads():
    """Checkpoints written before [ray]/[serve] existed: the missing sections take their defaults."""
    old = {k: v for k, v in Config().to_dict().items() if k not in RUNTIME_SECTIONS}
    config = config_from_json(json.dumps(old))
    assert config == Config()
    with pytest.raises(SuperweightsError, match="unknown config section"):
        config_from_json(json.dumps({**old, "serving": {}}))


def test_resume_ignores_runtime_sections_and_old_config_json(tmp_path):
    """`_check_same_config`: another worker count, [serve] or [debug] never refuses a resume, nor does a saved
    config.json without those sections; a training key still does."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoint_000000"
    ckpt.mkdir(parents=True)
    saved = load_config(None, TINY)
    old = {k: v for k, v in saved.to_dict().items() if k not in RUNTIME_SECTIONS}
    (ckpt / "config.json").write_text(json.dumps(old))
    from ray_jobs import driver

    original = driver.latest_local_checkpoint
    driver.latest_local_checkpoint = lambda d: ckpt  # the layout of a finished checkpoint is not the point here
    try:
        driver._check_same_config(run_dir, load_config(None, [*TINY, "ray.workers=2", "serve.port=1",
                                                              "debug.crash_at_epoch=1", "train.epochs=3"]))
        (ckpt / "config.json").write_text(json.dumps(saved.to_dict()))
        driver._check_same_config(run_dir, load_config(None, [*TINY, "ray.workers=0", "ray.max_failures=3"]))
        # a run saved with the old default evaluation batch resumes under the automatic one (and back)
        (ckpt / "config.json").write_text(json.dumps(load_config(None, [*TINY, "train.eval_batch_size=512"]).to_dict()))
        driver._check_same_config(run_dir, load_config(None, TINY))
        with pytest.raises(SuperweightsError, match="was trained with train.lr=0.05"):
            driver._check_same_config(run_dir, load_config(None, [*TINY, "train.lr=0.1"]))
    finally:
        driver.latest_local_checkpoint = original


@pytest.mark.slow
def test_toml_workers_0_trains_in_process_and_resumes_an_old_config_json(tmp_path, capsys):
    """`ray.workers = 0` in a TOML: `superweights train` runs the loop in this process. Its checkpoint's
    config.json, stripped of the runtime sections and of later [train] keys (an older checkpoint), still resumes,
    with other [ray] keys."""
    path = tmp_path / "run.toml"
    path.write_text(f'[ray]\nworkers = 0\nstorage_path = "{tmp_path / "runs"}"\n')
    base = ["train", "-c", str(path), "--no-tracking", "--name", "r", "--out", str(tmp_path / "out"), "-q"]
    sets = [a for s in TINY for a in ("--set", s)]
    assert cli.main([*base, *sets, "--set", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "parallelism: in this process" in out
    ckpts = sorted(p.parent for p in (tmp_path / "runs" / "r").rglob("config.json"))
    assert ckpts
    for c in ckpts:
        saved = json.loads((c / "config.json").read_text())
        assert saved["ray"]["workers"] == 0
        old = {k: v for k, v in saved.items() if k not in RUNTIME_SECTIONS}
        for key in ("precision", "compile", "channels_last"):  # [train] keys added after such checkpoints
            del old["train"][key]
        (c / "config.json").write_text(json.dumps(old))
    assert cli.main([*base, *sets, "--set", "train.epochs=2", "--set", "ray.checkpoint_every=2"]) == 0
    out = capsys.readouterr().out
    assert "resuming r" in out

"""`superweights serve MODEL`: anytime predictions over HTTP, on uvicorn (default) or Ray Serve (`--ray`).

Both serve the same FastAPI app (`anytime.http_app.create_app`); the budget logic and micro-batching live
in `anytime.serve_service.AnytimeService`, so Ray Serve only adds replicas and routing (and ~6-7 ms per request
on this kind of machine, DESIGN.md). MODEL is a checkpoint folder or an MLflow URI (`ray_jobs.model_uri`).

Ray Serve, three ways:

* `superweights serve MODEL --ray [--replicas N] [--max-ongoing-requests K] [--address ADDR]` deploys on a
  running cluster (or a local one) and blocks until ^C / SIGTERM;
* `python -m ray_jobs.serve MODEL --ray ...` is the same as a Ray Jobs entrypoint;
* `serve run ray_jobs.serve:build_app model=runs:/<id> replicas=2` (Ray's own CLI, an app builder).

Every replica resolves MODEL itself (an MLflow URI is the portable choice on a multi-node cluster; a folder
must exist on every node). `ray` and `mlflow` are imported lazily: `superweights serve` without `--ray`
never imports ray.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, fields

from core.errors import SuperweightsError

from .exit_codes import run_guarded
from .model_uri import resolved_model

APP_NAME = "superweights-anytime"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The serve command's options (shared by `superweights serve` and `python -m ray_jobs.serve`). Every flag
    but MODEL and --tracking-uri/--ray has a `[serve]` config key of the same name (`--config`, `--set
    serve.port=9000`); a flag given overrides it: flag > --set > TOML > default."""
    from ensemble.config import ServeConfig

    d = ServeConfig()
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint folder, runs:/<run id>[/path] or models:/<name>/<version> (MLflow)")
    p.add_argument("--config", "-c", help="TOML config file whose [serve] section sets the defaults below")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key with a TOML value, e.g. serve.port=9000; repeatable")
    p.add_argument("--host", help=f"interface to listen on (default: {d.host})")
    p.add_argument("--port", type=int, help=f"port (default: {d.port}; 0 = any free port)")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--device", help=f"cpu, cuda or cuda:N (default: {d.device})")
    p.add_argument("--threads", type=int,
                   help=f"torch intra-op threads (default: {d.threads}; small micro-batches gain little from more, and "
                        "spinning threads slow everything down when the cores are shared)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request (uvicorn)")
    g = p.add_argument_group("limits and micro-batching")
    g.add_argument("--max-body-mb", type=float,
                   help=f"largest request body in MiB, larger is a 413 (default: {d.max_body_mb:g})")
    g.add_argument("--max-images", type=int, help=f"most images per request (default: {d.max_images})")
    g.add_argument("--max-batch-images", type=int, help=f"most images per micro-batch (default: {d.max_batch_images})")
    g.add_argument("--batch-window-ms", type=float,
                   help="how long a FLOPs/no-budget request waits for others with the same budget "
                        f"(default: {d.batch_window_ms:g}; 0 = only batch what is already queued)")
    g.add_argument("--max-pending", type=int, help=f"queued requests beyond this get 503 (default: {d.max_pending})")
    g.add_argument("--deadline-margin-ms", type=float,
                   help=f"time kept free at the end of a deadline (default: {d.deadline_margin_ms:g})")
    g.add_argument("--any-input-range", action="store_true",
                   help="accept any finite input values (default: serve.input_range, [0, 1], the loader's scale)")
    r = p.add_argument_group("Ray Serve")
    r.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of a local uvicorn")
    r.add_argument("--replicas", type=int, help=f"replicas (default: {d.replicas})")
    r.add_argument("--max-ongoing-requests", type=int,
                   help=f"requests a replica holds at once; its micro-batcher groups them (default: {d.max_ongoing_requests})")
    r.add_argument("--replica-cpus", type=float, help=f"CPUs reserved per replica (default: {d.replica_cpus:g})")
    r.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else the running local cluster, "
                                    "else a new local Ray)")


_FLAG_KEYS = ("host", "port", "device", "threads", "max_body_mb", "max_images", "max_batch_images", "batch_window_ms",
              "max_pending", "deadline_margin_ms", "replicas", "max_ongoing_requests", "replica_cpus",
              "address")  # argparse dest == ServeConfig field


def serve_config_from_args(args):
    """`[serve]` of --config / --set (checked by the loader), then the flags given (checked here, named as flags)."""
    import dataclasses

    from ensemble.config import load_config

    serve_config = load_config(getattr(args, "config", None), list(getattr(args, "overrides", []) or [])).serve
    given = {k: getattr(args, k) for k in _FLAG_KEYS if getattr(args, k, None) is not None}
    if getattr(args, "no_access_log", False):
        given["access_log"] = False
    if getattr(args, "any_input_range", False):
        given["input_range"] = ()
    if "max_body_mb" in given and not given["max_body_mb"] > 0:
        raise SuperweightsError(f"--max-body-mb must be > 0, got {given['max_body_mb']:g}")
    if "threads" in given and given["threads"] < 1:
        raise SuperweightsError(f"--threads must be >= 1, got {given['threads']}")
    if "port" in given and not 0 <= given["port"] <= 65535:
        raise SuperweightsError(f"--port must be in 0..65535, got {given['port']}")
    return dataclasses.replace(serve_config, **given)


def settings_from_args(args, serve_config=None):
    """The service's `ServeSettings`: the view of `serve_config_from_args(args)` with the device resolved."""
    from anytime.serve_service import ServeSettings
    from ensemble.training import resolve_device

    sc = serve_config if serve_config is not None else serve_config_from_args(args)
    return ServeSettings.from_config(sc, device=str(resolve_device(sc.device)))


def load_service(model: str, tracking_uri: str | None, settings, threads: int | None = None):
    """Resolve MODEL (folder or MLflow URI) and build the service (weights materialised, steps timed)."""
    import torch

    from anytime.serve_service import AnytimeService

    if threads:
        torch.set_num_threads(threads)
    with resolved_model(model, tracking_uri) as folder:
        return AnytimeService.from_folder(folder, settings, source=model)


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SuperweightsError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise SuperweightsError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def run_uvicorn(args, settings, log=print, serve_config=None) -> int:
    import uvicorn

    from anytime.http_app import create_app

    sc = serve_config if serve_config is not None else serve_config_from_args(args)
    sock = _listen(sc.host, sc.port)  # before loading: a busy port fails fast
    service = load_service(args.model, args.tracking_uri, settings, sc.threads)
    gc.collect()
    gc.freeze()  # start-up objects (torch, the model) leave the collector: no long gen-2 pauses while serving
    host, port = sock.getsockname()[:2]
    log(f"serving {args.model} ({', '.join(service.names)}) on http://{host}:{port}  "
        f"(OpenAPI docs: http://{host}:{port}/docs)")
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="info", lifespan="on",
                                           access_log=sc.access_log))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)  # uvicorn re-raises the signal after its graceful shutdown
    try:
        server.run(sockets=[sock])  # ^C / SIGTERM: stop accepting, finish in-flight requests, then return
    except KeyboardInterrupt:
        pass
    log("stopped")
    return 0


# -- Ray Serve --------------------------------------------------------------------------------------------


class AnytimeDeployment:
    """One Ray Serve replica: resolves and loads MODEL, then serves `create_app(service)` (the app uvicorn
    serves) via `serve.ingress()` + `__serve_build_asgi_app__`. `predict(payload)` is the same request path
    for deployment handles (no HTTP)."""

    def __init__(self, model: str, tracking_uri: str | None = None, settings: dict | None = None,
                 threads: int | None = None):
        from anytime.serve_service import ServeSettings

        self.service = load_service(model, tracking_uri, ServeSettings(**(settings or {})), threads)
        gc.collect()
        gc.freeze()  # as run_uvicorn: a replica process serves only this model

    def __serve_build_asgi_app__(self):
        from anytime.http_app import create_app

        return create_app(self.service)

    async def predict(self, payload: dict | bytes) -> dict:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await self.service.predict_body(body)

    async def model_info(self) -> dict:
        return self.service.model_info()


def deployment(model: str, tracking_uri: str | None = None, settings=None, *, replicas: int = 1,
               max_ongoing_requests: int = 16, replica_cpus: float = 1.0, threads: int | None = None):
    """The Ray Serve application (bound deployment) serving MODEL; `serve.run(deployment(...))`."""
    from ray import serve

    from anytime.serve_service import ServeSettings

    if replicas < 1 or max_ongoing_requests < 1:
        raise SuperweightsError(f"--replicas and --max-ongoing-requests must be >= 1, got {replicas} "
                                f"and {max_ongoing_requests}")
    settings = settings if settings is not None else ServeSettings()
    cls = serve.deployment(serve.ingress()(AnytimeDeployment), name="AnytimeDeployment", num_replicas=replicas,
                           max_ongoing_requests=max_ongoing_requests,
                           ray_actor_options={"num_cpus": replica_cpus})
    return cls.bind(model, tracking_uri, asdict(settings), threads)


def build_app(args: dict):
    """App builder for Ray's CLI: `serve run ray_jobs.serve:build_app model=... [replicas=2] [tracking_uri=...]
    [max_ongoing_requests=16] [any ServeSettings field=value]`."""
    from anytime.serve_service import ServeSettings

    args = dict(args)
    if "model" not in args:
        raise SuperweightsError("build_app needs model=<checkpoint folder or MLflow URI>")
    model, tracking_uri = args.pop("model"), args.pop("tracking_uri", None)
    opts = {k: type(v)(args.pop(k)) for k, v in (("replicas", 1), ("max_ongoing_requests", 16),
                                                 ("replica_cpus", 1.0)) if k in args}
    kinds = {f.name: f.type for f in fields(ServeSettings)}
    unknown = sorted(set(args) - set(kinds))
    if unknown:
        raise SuperweightsError(f"unknown build_app arguments {unknown}; valid: model, tracking_uri, replicas, "
                                f"max_ongoing_requests, replica_cpus, {', '.join(kinds)}")
    conv = {"int": int, "float": float, "str": str}
    settings = ServeSettings(**{k: conv.get(kinds[k], json.loads)(v) if isinstance(v, str) else v
                                for k, v in args.items()})
    return deployment(model, tracking_uri, settings, **opts)


def run_ray(args, settings, log=print, serve_config=None) -> int:
    sc = serve_config if serve_config is not None else serve_config_from_args(args)
    if sc.port == 0:
        raise SuperweightsError("--ray needs a fixed --port (the Serve HTTP proxy cannot pick one)")
    import ray
    from ray import serve

    from anytime.store import check_weights_file
    from ensemble.checkpoint import load_plan

    from .model_uri import is_mlflow_uri, resolve_tracking_uri

    with resolved_model(args.model, args.tracking_uri) as folder:  # fail fast here, not in every replica
        load_plan(folder)
        check_weights_file(folder)  # NaN/inf weights: one line here, not a failed replica
    if is_mlflow_uri(args.model):
        model, tracking_uri = args.model, resolve_tracking_uri(args.tracking_uri)  # absolute: replicas' cwd differs
    else:
        from pathlib import Path

        model, tracking_uri = str(Path(args.model).expanduser().absolute()), None
    app = deployment(model, tracking_uri, settings, replicas=sc.replicas,
                     max_ongoing_requests=sc.max_ongoing_requests, replica_cpus=sc.replica_cpus,
                     threads=sc.threads)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    ray.init(address=sc.address or None, ignore_reinit_error=True)
    serve.start(http_options={"host": sc.host, "port": sc.port})
    try:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except (KeyboardInterrupt, SuperweightsError):
            raise
        except Exception as e:  # a replica failed to start (its traceback is in the Ray logs)
            raise SuperweightsError(f"Ray Serve could not start {args.model}: {' '.join(str(e).split())[:300]}") from None
        log(f"serving {args.model} on Ray Serve at http://{sc.host}:{sc.port} with {sc.replicas} "
            f"replica(s) (OpenAPI docs: /docs); ^C to stop")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log("stopped")
        return 0
    finally:
        serve.delete(APP_NAME)


def run_from_args(args, log=print) -> int:
    sc = serve_config_from_args(args)
    settings = settings_from_args(args, sc)
    if args.ray:
        return run_ray(args, settings, log, sc)
    return run_uvicorn(args, settings, log, sc)


def _sigterm(signum, frame):  # `ray job stop` sends SIGTERM: unwind so the app is deleted
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.serve",
                                     description="Serve anytime predictions over HTTP (uvicorn or Ray Serve).")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run_from_args(args, log=lambda s: print(s, flush=True)))


if __name__ == "__main__":
    sys.exit(main())

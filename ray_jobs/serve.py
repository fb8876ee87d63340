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

This module is the command: uvicorn (`run_uvicorn`) or Ray Serve (`run_ray`). Its pieces: `serve_options`
(the flags and `[serve]`), `serve_deployment` (the Ray Serve replica and app, and `load_service`).
"""

from __future__ import annotations

import argparse
import gc
import signal
import socket
import sys
import threading
import time

from core.errors import SuperweightsError

from .exit_codes import run_guarded
from .model_uri import resolved_model
from .serve_deployment import build_app, deployment, load_service  # noqa: F401  (build_app: Ray's `serve run`)
from .serve_options import add_serve_arguments, serve_config_from_args, settings_from_args

APP_NAME = "superweights-anytime"


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
    p = service.predictor
    how = "measured at start-up" if p.memory_format == "auto" else "fixed by --memory-format / serve.memory_format"
    log(f"conv weights: {p.layout_summary()} ({how})")
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


def run_ray(args, settings, log=print, serve_config=None) -> int:
    sc = serve_config if serve_config is not None else serve_config_from_args(args)
    if sc.port == 0:
        raise SuperweightsError("--ray needs a fixed --port (the Serve HTTP proxy cannot pick one)")
    import ray
    from ray import serve

    from anytime.store import check_weights_file
    from ensemble.checkpoint import load_plan

    from .model_uri import is_mlflow_uri, resolve_tracking_uri
    from .storage_uri import is_uri

    with resolved_model(args.model, args.tracking_uri) as folder:  # fail fast here, not in every replica
        load_plan(folder)
        check_weights_file(folder)  # NaN/inf weights: one line here, not a failed replica
    if is_mlflow_uri(args.model):
        model, tracking_uri = args.model, resolve_tracking_uri(args.tracking_uri)  # absolute: replicas' cwd differs
    elif is_uri(args.model):  # a storage URI: each replica fetches the model files itself
        model, tracking_uri = args.model, None
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

"""The serve command's options: its flags (`add_serve_arguments`, shared by `superweights serve` and
`python -m ray_jobs.serve`) and how they resolve against the config's `[serve]` section into a `ServeConfig`
and the service's `ServeSettings`. Precedence: flag > `--set serve.key=value` > TOML > default."""

from __future__ import annotations

import argparse

from core.errors import SuperweightsError


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The serve command's options (shared by `superweights serve` and `python -m ray_jobs.serve`). Every flag
    but MODEL and --tracking-uri/--ray has a `[serve]` config key of the same name (`--config`, `--set
    serve.port=9000`); a flag given overrides it: flag > --set > TOML > default."""
    from ensemble.config import ServeConfig
    from ensemble.config_sections import SERVE_MEMORY_FORMATS

    d = ServeConfig()
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint folder, that folder on storage (s3://, gs://, file://), runs:/<run id>[/path] or "
                        "models:/<name>/<version> (MLflow)")
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
    p.add_argument("--memory-format", choices=SERVE_MEMORY_FORMATS,
                   help=f"layout of the conv weights (default: {d.memory_format}: both are measured per batch size at "
                        "start-up and the faster runs it, holding the conv weights twice; which wins depends on the "
                        "model, batch size and device)")
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


_FLAG_KEYS = ("host", "port", "device", "threads", "memory_format", "max_body_mb", "max_images", "max_batch_images",
              "batch_window_ms", "max_pending", "deadline_margin_ms", "replicas", "max_ongoing_requests", "replica_cpus",
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

"""The Ray Serve side of `superweights serve --ray`: one replica (`AnytimeDeployment`, serving the same FastAPI
app uvicorn serves), the bound application (`deployment`) and the app builder for Ray's own CLI (`build_app`,
also importable as `ray_jobs.serve:build_app`). `load_service` is how both uvicorn and every replica load
MODEL. `ray` is imported lazily, when a deployment is built."""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, fields

from core.errors import SuperweightsError

from .model_uri import resolved_model


def load_service(model: str, tracking_uri: str | None, settings, threads: int | None = None):
    """Resolve MODEL (folder or MLflow URI) and build the service (weights materialised, steps timed)."""
    import torch

    from anytime.serve_service import AnytimeService

    if threads:
        torch.set_num_threads(threads)
    with resolved_model(model, tracking_uri) as folder:
        return AnytimeService.from_folder(folder, settings, source=model)


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

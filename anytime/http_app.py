"""The HTTP app for budgeted anytime predictions (FastAPI): `create_app(service)`; uvicorn serves it as is,
Ray Serve wraps it (`ray_jobs.serve`). The model, validation and micro-batching are `AnytimeService`'s
(`anytime.serve_service`); the wire format is `anytime.serve_schemas`. Routes:

* `POST /predict` `{"inputs": (N, C, H, W) nested lists in the loader's scale ([0, 1], un-normalised),
  "budget": {"flops": F} | {"ms": T} | {"mean_flops": F} | {"confidence": c} | null}` -> `{"predictions",
  "probabilities", "steps", "flops", "image_steps", "image_flops", "confidence", "elapsed_ms", "deadline_met",
  "batch_images"}`.
* `GET /health`, `GET /model` (members, exits, the schedule with cumulative FLOPs, useful budget range, the
  checkpoint's name and sha256 content hashes: never a filesystem path).

Every client mistake is a 4xx JSON `{"detail": "<one line>"}` (415 unless the body is `application/json`);
non-finite model outputs are a 503 with a message saying so (never a 500 from serialising NaN); anything
else is a 500 with a generic detail (the traceback goes to the server log, never to the client). A model
whose weights are not all finite is refused at start-up (`check_finite`).

`POST /predict` is answered by `AnytimeApp.__call__` before FastAPI's middleware stack, routing and dependency
resolution (the route stays registered for the OpenAPI page and the 405 of other methods): under cProfile
(issue 15) that machinery was about half of the event loop's time per request (0.64 of 1.34 profiled ms),
and /predict uses none of it (it reads its body and answers every error itself). On a busy machine every layer
a request walks through runs with cold caches, at ~10x its quiet cost, so layers matter more than their hot
microseconds suggest. Responses are encoded with orjson (64 images x 100 classes: 5-8 ms with json.dumps,
0.3 ms with orjson). Every other path goes through FastAPI as usual.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .serve_schemas import ApiError, ErrorResponse, PredictRequest, PredictResponse, check_json_content_type
from .serve_service import AnytimeService

log = logging.getLogger("superweights.serve")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it all. Reads the ASGI
    messages itself (not `request.stream()`, an async generator a few steps longer per request); a client
    that goes away is `ClientDisconnect`, as there."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared!r}") from None
        if n > limit:
            raise ApiError(413, f"request body of {n:,} bytes is over the limit of {limit:,} bytes; "
                                "send fewer images per request")
    receive, chunks, size = request.receive, [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes; send fewer images per request")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def route_path(scope: Scope) -> str:
    """The path the app routes on: `scope["path"]` less the `root_path` a proxy or a mount put in front (as
    Starlette's router computes it; Ray Serve sets a root path for a route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


class AnytimeApp(FastAPI):
    """FastAPI, except that `POST /predict` goes straight to its endpoint (see the module docstring)."""

    predict_endpoint = None  # async (Request) -> Response that never raises for a request; set by create_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.predict_endpoint is not None:
            if self.root_path:
                scope["root_path"] = self.root_path  # as FastAPI.__call__ does, before routing
            if route_path(scope) == "/predict":
                scope["app"] = self
                response = await self.predict_endpoint(Request(scope, receive))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"detail": e.message}, status_code=e.status)


# -- the app ----------------------------------------------------------------------------------------------

DESCRIPTION = """Anytime predictions of a SuperWeight ensemble with early exits under a budget.

`POST /predict` runs the longest prefix of the model's schedule (see `GET /model`) that fits the budget:
`{"flops": F}` per image (never exceeded; below the first step's FLOPs is a 422), `{"ms": T}` a deadline from
the request's arrival (a step starts only if its measured time fits; the first step always runs),
`{"mean_flops": F}` per-input early exit at the confidence level fitted on validation data for an average of F
FLOPs per image, `{"confidence": c}` per-input early exit at level c in [0, 1] (an image stops after the first
step whose ensemble confidence is above c), or `null` (the whole schedule). Responses report, per image, the
steps it ran (`image_steps`) and its FLOPs (`image_flops`). The body must be `Content-Type: application/json`. Errors are JSON `{"detail": "..."}`:
400 malformed JSON, 413 too large, 415 not application/json, 422 invalid, 503 busy or a non-finite model
output."""


def create_app(service: AnytimeService) -> FastAPI:
    """The FastAPI app around `service` (uvicorn serves it as is; `ray_jobs.serve` wraps it in Ray Serve)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.batcher.aclose()

    app = AnytimeApp(title="superweights anytime predictor", version="1", description=DESCRIPTION,
                     lifespan=lifespan)
    app.state.service = service
    errors = {c: {"model": ErrorResponse} for c in (400, 413, 415, 422, 503)}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"detail": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.get("/health", summary="liveness and queue statistics")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/model", summary="members, exits, schedule with cumulative FLOPs, useful budget range, checkpoint hashes")
    async def model() -> dict[str, Any]:
        return service.model_info()

    @app.post("/predict", response_model=PredictResponse, responses=errors,
              summary="anytime prediction under a FLOPs budget or a deadline")
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            check_json_content_type(request.headers.get("content-type"))  # 415 before the body is read
            out = await service.predict_request(lambda: read_body(request, service.settings.max_body_bytes), t0)
            return Response(orjson.dumps(out), media_type="application/json")
        except ApiError as e:
            return error_response(e)
        except Exception:  # answered here, not by the server-error middleware, so the connection stays usable
            log.exception("internal error on POST /predict")
            return JSONResponse({"detail": "internal server error"}, status_code=500)

    app.predict_endpoint = predict

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            req = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(req.pop("$defs", {}))
            components["PredictRequest"] = req
            schema["paths"]["/predict"]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app

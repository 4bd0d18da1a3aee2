"""The FastAPI application: endpoints, limits, dynamic batching, metrics, draining.

``create_app(post_predictor, config)`` wraps a loaded :class:`PostPredictor` (the same
object ``sgmft predict`` uses); ``load_app(run_dir, ...)`` loads one first. Endpoints
(docs/serve.md): ``POST /v1/predict`` (multipart or base64 JSON), ``POST
/v1/predict/batch``, ``POST /v1/predict/features``, ``GET /v1/model``, ``GET|HEAD
/v1/health``, ``GET|HEAD /v1/ready``, ``GET /metrics``, the OpenAPI docs at ``/docs``
(Swagger UI from the ``fastapi-offline`` package, no CDN) and the page at ``/``.

Requests carry images as bytes only (uploads or base64); nothing in a request is ever
used as a path on the server. What a request may carry is checked in
:mod:`sgmft.serve.inputs`, the Host/Origin/body checks are in :mod:`sgmft.serve.guard`.

The endpoints are routers in :mod:`sgmft.serve.routes`; what an app instance shares
(predictor, batchers, decoder, metrics, draining) is :class:`sgmft.serve.service.Service`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from sgmft.serve.config import ServeConfig
from sgmft.serve.guard import Guard
from sgmft.serve.routes import (STATIC, features_asgi, install_error_handlers, model_info, predict_router,
                                service_router)
from sgmft.serve.schemas import PostIn, PredictionOut, openapi
from sgmft.serve.service import Service

API_VERSION = "v1"


def _run_info(pp) -> dict:
    """Training facts for /v1/model: run.json's metrics and the evaluation reports (read as the
    model card reads them, :meth:`sgmft.runs.RunDir.evaluations`), no paths."""
    from sgmft.runs import locate

    _, run = locate(pp.predictor.info.get("path", "."))
    d = run.read_run_json() if run is not None else None
    if d is None:
        return {}
    info: dict[str, Any] = {"training": {k: d[k] for k in ("preset", "best_val_acc", "epochs_run", "num_train",
                                                          "num_val", "num_test", "seconds") if k in d}}
    evals = {Path(m["report"]).name.removeprefix("eval-"): {k: m[k] for k in ("accuracy", "macro_f1", "num_samples")
                                                            if k in m} for m in run.evaluations()}
    if evals:
        info["evaluation"] = evals
    info["run"] = run.root.name
    return info



# -- the app -------------------------------------------------------------------------------------
class _ServiceApp(FastAPI):
    """FastAPI, plus hot endpoints that go straight to the :class:`Guard` (same checks, same metrics)
    without Starlette's outer middleware stack: at one post per request that stack costs as much as
    the model's forward."""

    fast: dict = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            guard = self.fast.get((scope["method"], scope["path"]))
            if guard is not None:
                return await guard(scope, receive, send)
        await FastAPI.__call__(self, scope, receive, send)


def create_app(pp, config: ServeConfig | None = None) -> "FastAPIOffline":
    """A FastAPI app serving ``pp`` (a loaded :class:`~sgmft.predict.PostPredictor`)."""
    from contextlib import asynccontextmanager

    cfg = config or ServeConfig()
    svc = Service(pp, cfg, _run_info(pp))

    @asynccontextmanager
    async def lifespan(app):
        yield
        await svc.close()

    app = FastAPIOffline(
        title="sgmft", version=API_VERSION, lifespan=lifespan, redoc_url=None,
        description="Semantic place of social-media posts (text + images) with a trained SG-MFT run. "
                    "Errors are JSON: {\"error\": {\"code\", \"message\", \"field\", \"limit\", \"hint\"}}. "
                    "The limits in force are in info.x-limits and in the schemas.")
    app.__class__ = _ServiceApp     # fastapi-offline builds a plain FastAPI; ours adds the fast routes
    app.state.service = svc
    install_error_handlers(app)
    app.include_router(predict_router(svc))
    app.include_router(service_router(svc))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def _openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi(app, cfg, pp.predictor.dim)
        return app.openapi_schema

    app.openapi = _openapi
    cors = cfg.split(cfg.cors_origins)
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["content-type"], max_age=600)
    fast = {("POST", "/v1/predict/features"): features_asgi(svc)}
    app.add_middleware(Guard, service=svc, fast=fast)
    if not cors:     # (with CORS on, every request goes through CORSMiddleware)
        stack = functools.partial(FastAPI.__call__, app)             # (never reached for these routes)
        app.fast = {k: Guard(stack, svc, fast) for k in fast}
    return app


def load_app(run_dir, config: ServeConfig | None = None, **load_kw):
    """Load a run (``PostPredictor.load(run_dir, **load_kw)``) and wrap it in an app (glibc's
    allocator left at its defaults: :func:`sgmft.features.backbones.allocator.serving_default`)."""
    from sgmft.features.backbones.allocator import serving_default
    from sgmft.predict import PostPredictor

    serving_default()

    return create_app(PostPredictor.load(run_dir, **load_kw), config)


__all__ = ["PostIn", "PredictionOut", "Service", "create_app", "load_app", "model_info"]

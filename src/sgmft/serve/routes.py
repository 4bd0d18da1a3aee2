"""The endpoints of the HTTP service, as FastAPI routers, and the answers they build.

:func:`predict_router` (``/v1/predict``, ``/v1/predict/batch``, ``/v1/predict/features``)
and :func:`service_router` (``/v1/model``, health, readiness, metrics, the page) are
included by :func:`sgmft.serve.app.create_app`; :func:`features_asgi` serves
``/v1/predict/features`` without FastAPI's layers (the route documents it). Every answer is
the predictor's one result (:func:`sgmft.predict.posts.post_result`) with the request's
image indices mapped on top.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sgmft.predict.posts import post_result
from sgmft.serve import inputs
from sgmft.serve.errors import ApiError, from_validation
from sgmft.serve.schemas import (BatchIn, BatchOut, ErrorOut, FeaturesIn, FeaturesOut, PostIn, PredictionOut,
                                 form_schema, ref)
from sgmft.serve.service import Service

__all__ = ["STATIC", "features_answer", "features_asgi", "install_error_handlers", "model_info", "predict_router",
           "service_router"]

STATIC = Path(__file__).parent / "static"
_ERRORS = {s: {"model": ErrorOut} for s in (400, 403, 413, 415, 422, 503)}


# -- answers -------------------------------------------------------------------------------------
def _plain(v):
    """numpy scalars -> Python numbers, recursively (an explanation may hold them)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v.item() if isinstance(v, np.generic) else v


def _uncertain(prob: float, min_confidence: float | None, default) -> bool:
    return bool(prob < min_confidence) if min_confidence is not None else bool(default or False)


def _answer(res: dict, post: inputs.CheckedPost) -> dict:
    """A PostPredictor result (:func:`~sgmft.predict.posts.post_result`) -> the API's answer
    (image indices as the client sent them)."""
    pre = f"{post.field}." if post.field else ""
    for j, reason in res.get("image_rejects") or []:   # decoded already: only if the predictor refuses one
        img = inputs.ImageIn(post.used[j], f"{pre}images[{post.used[j]}]", str(post.decoded[j]), b"")
        if post.on_bad_image == "error":
            post.bad(img, inputs.decode_failure(reason))     # raises; with 'skip' the warning is the predictor's
    idx = res["image_index"]
    index: Any = [post.used[i] for i in idx] if isinstance(idx, list) else (None if idx is None else post.used[idx])
    name: Any = [post.names[i] for i in idx] if isinstance(idx, list) else (None if idx is None else post.names[idx])
    # the predictor's result (sgmft.predict.posts.post_result), with the request's image indices, names and
    # skipped images on top; no paths (image_used, image_rejects) leave the server
    out = {k: v for k, v in res.items() if k not in ("image_used", "image_rejects")}
    out.update(uncertain=_uncertain(res["prob"], post.min_confidence, res.get("uncertain")),
               explanation=_plain(res.get("explanation")), image_index=index, image_name=name,
               warnings=post.skipped + list(res["warnings"]))
    return out


def _json(model, data) -> Response:
    """Validate ``data`` against the response model and serialise it (pydantic, in Rust)."""
    return Response(model.model_validate(data).model_dump_json(), media_type="application/json")


def _parse_json(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation(e.errors(include_url=False)) from None


def _check_batch_size(n: int, cfg) -> None:
    """422 when a batch request carries more posts than ``--max-batch-posts``."""
    if n > cfg.max_batch_posts:
        raise ApiError(422, "too_many_posts", f"{n} posts in one request; at most {cfg.max_batch_posts} are "
                       "allowed. Split the batch.", field="posts", limit=cfg.max_batch_posts,
                       hint="server flag --max-batch-posts")


async def _predict_posts(svc: Service, posts: list[inputs.CheckedPost]) -> list[dict]:
    """Decode the request's images off the inference thread (checked already), then predict."""
    await svc.decoder.decode(posts)
    res = await svc.submit(svc.posts, posts)
    return [_answer(r, p) for r, p in zip(res, posts)]


def _feature_items(body: FeaturesIn, d: int) -> tuple[list, list]:
    items, notes = [], []
    for i, p in enumerate(body.posts):
        vecs, warn = [], []
        for name in ("text", "image"):
            v = getattr(p, name)
            if v is None:
                vecs.append(None)
                continue
            if len(v) != d:
                raise ApiError(422, "wrong_dimension", f"posts[{i}].{name} has {len(v)} values; this model "
                               f"expects D={d} (features of its backbone).", field=f"posts[{i}].{name}", limit=d)
            a = np.asarray(v, np.float32)
            norm = float(np.sqrt(a @ a))
            if abs(norm - 1) > 1e-2:
                warn.append(f"{name} vector has norm {norm:.3g}; the model was trained on L2-normalised "
                            "backbone features")
            vecs.append(a)
        if vecs[0] is None and vecs[1] is None:
            warn.append("no text or image vector: the prediction is the model's answer for an empty post")
        items.append((vecs[0], vecs[1], body.explain))
        notes.append(warn)
    return items, notes


# -- /v1/model without paths --------------------------------------------------------------------
def _looks_like_path(ref_: str) -> bool:
    return bool(ref_) and (os.path.isabs(ref_) or ref_.startswith((".", "~")) or os.path.exists(ref_))


def _public_spec(spec: str) -> tuple[str, str | None]:
    """``chinese-clip:/models/vit-h`` -> (``chinese-clip:vit-h``, the path hidden); hub ids stay."""
    name, sep, ref_ = spec.partition(":")
    if sep and _looks_like_path(ref_):
        return f"{name}:{Path(ref_).name}", ref_
    return spec, None



def model_info(svc: Service) -> dict:
    pp, cfg = svc.pp, svc.cfg
    clean = dataclasses.asdict(pp.cleaner.cfg)
    spec, hidden = (pp.backbone.spec, None) if cfg.expose_paths else _public_spec(pp.backbone.spec)
    notes = list(pp.notes)
    if not cfg.expose_paths:
        if clean.get("user_dict"):
            clean["user_dict"] = Path(str(clean["user_dict"])).name
        if hidden:
            notes = [n.replace(hidden, Path(hidden).name) for n in notes]
    return {"labels": pp.label_names, "backbone": spec, "dim": pp.backbone.dim,
            "preset": pp.predictor.info.get("preset") or svc.run_info.get("training", {}).get("preset", ""),
            "image_choice": pp.image_choice, "clean_config": clean, "notes": notes, **svc.run_info,
            "limits": cfg.limits()}


def install_error_handlers(app) -> None:
    """Every error as the API's JSON error (:class:`~sgmft.serve.errors.ApiError`)."""
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        msg = {404: f"There is nothing at {request.url.path}; the API is under /v1 (see /docs).",
               405: f"{request.method} is not allowed on {request.url.path} (see /docs)."}.get(exc.status_code,
                                                                                             str(exc.detail))
        return ApiError(exc.status_code, code, msg, headers=getattr(exc, "headers", None)).response()


def predict_router(svc: Service) -> APIRouter:
    """``POST /v1/predict``, ``/v1/predict/batch`` and ``/v1/predict/features``."""
    app, cfg = APIRouter(), svc.cfg

    @app.post("/v1/predict", response_model=PredictionOut, responses={**_ERRORS, 415: {"model": ErrorOut}},
              tags=["predict"], openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": form_schema(cfg)},
                  "application/json": {"schema": ref("PostIn")}}}})
    async def predict(request: Request):
        """One raw post: text plus zero or more images, as a multipart upload or base64 JSON."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            post = await inputs.post_from_form(request, cfg)
        elif ctype in ("application/json", ""):
            post = inputs.post_from_json(_parse_json(PostIn, await request.body()), None, cfg,
                                         inputs.PixelBudget(cfg))
        else:
            raise ApiError(415, "unsupported_media_type", f"The body's type {ctype!r} is not supported. Send "
                           "multipart/form-data or application/json.", field="content-type")
        (out,) = await _predict_posts(svc, [post])
        return _json(PredictionOut, out)

    @app.post("/v1/predict/batch", response_model=BatchOut, responses=_ERRORS, tags=["predict"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ref("BatchIn")}}}})
    async def predict_batch(request: Request):
        """Several raw posts (JSON, images in base64), at most ``--max-batch-posts``."""
        body = _parse_json(BatchIn, await request.body())
        _check_batch_size(len(body.posts), cfg)
        budget = inputs.PixelBudget(cfg, batch=True)
        posts = [inputs.post_from_json(p, i, cfg, budget, body.min_confidence) for i, p in enumerate(body.posts)]
        return _json(BatchOut, {"predictions": await _predict_posts(svc, posts)})

    @app.post("/v1/predict/features", response_model=FeaturesOut, responses=_ERRORS, tags=["predict"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ref("FeaturesIn")}}}})
    async def predict_features(request: Request):
        """Posts as D-vectors from the run's backbone (for clients that run the encoder themselves)."""
        # (served by features_asgi, which the Guard calls directly; this route documents it)
        return Response(await features_answer(svc, await request.body()), media_type="application/json")

    return app


async def features_answer(svc: Service, raw: bytes) -> bytes:
    """The JSON answer of /v1/predict/features for the body ``raw`` (ApiError for a bad request)."""
    pp = svc.pp
    body = _parse_json(FeaturesIn, raw)
    _check_batch_size(len(body.posts), svc.cfg)
    items, notes = _feature_items(body, pp.predictor.dim)
    results = await svc.submit(svc.features, items)
    names, mc = pp.label_names, body.min_confidence
    out = []
    for i, ((t, im, _), (pr, unc, expl), warn) in enumerate(zip(items, results, notes)):
        if not np.isfinite(pr).all():
            raise ApiError(422, "invalid_value", f"posts[{i}]: the model's output is not a number for these "
                           "vectors; send L2-normalised backbone features.", field=f"posts[{i}]")
        res = post_result(names, pr, explanation=_plain(expl), text_mask=t is not None, image_mask=im is not None,
                          warnings=warn)
        res["uncertain"] = _uncertain(res["prob"], mc, unc)
        out.append(res)
    return FeaturesOut.model_validate({"predictions": out}).model_dump_json().encode()


def features_asgi(svc: Service):
    """``POST /v1/predict/features`` as a bare ASGI handler: the same answer as the route, without
    FastAPI's routing, dependency and exception layers, which cost more than the model's forward
    when a request carries one post (benchmarks/bench_serve.py; docs/serve.md#speed)."""
    from starlette.requests import ClientDisconnect

    async def handle(scope, receive, send) -> None:
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        try:
            out = await features_answer(svc, b"".join(chunks))
        except ApiError as e:
            await e.response()(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    return handle


def service_router(svc: Service) -> APIRouter:
    """``GET /v1/model``, ``GET|HEAD /v1/health`` and ``/v1/ready``, ``GET /metrics`` and the page
    at ``/`` (the page's ``/static`` files are mounted by the app: a router cannot carry a mount)."""
    app = APIRouter()

    @app.get("/v1/model", tags=["service"])
    async def model():
        """Label names, backbone, D, preset, training metrics and the limits in force (no paths unless
        the server runs with --expose-paths)."""
        return model_info(svc)

    @app.head("/v1/health", include_in_schema=False)
    @app.get("/v1/health", tags=["service"])
    async def health():
        """Liveness: 200 while the process serves HTTP."""
        return {"status": "ok"}

    @app.head("/v1/ready", include_in_schema=False)
    @app.get("/v1/ready", tags=["service"], responses={503: {"description": "draining"}})
    async def ready():
        """Readiness: 200 when the model is loaded and the server takes requests; 503 while draining."""
        if svc.draining or not svc.ready:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        body, ctype = svc.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    return app

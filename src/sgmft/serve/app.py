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
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sgmft.serve import inputs
from sgmft.serve.batching import Batcher, QueueFull
from sgmft.serve.config import ServeConfig
from sgmft.serve.errors import ApiError, from_validation
from sgmft.serve.guard import Guard
from sgmft.serve.metrics import Metrics
from sgmft.serve.schemas import (BatchIn, BatchOut, ErrorOut, FeaturesIn, FeaturesOut, PostIn, PredictionOut,
                                 form_schema, openapi, ref)

STATIC = Path(__file__).parent / "static"
API_VERSION = "v1"
_ERRORS = {s: {"model": ErrorOut} for s in (400, 403, 413, 415, 422, 503)}


class Service:
    """Everything an app instance shares: the predictor, the batchers, the decoder, metrics, draining."""

    def __init__(self, pp, config: ServeConfig, run_info: dict):
        from sgmft.features.encode import reduce_side

        self.pp, self.cfg, self.run_info = pp, config, run_info
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgmft-infer")
        self.decoder = inputs.Decoder(config.decode_workers, config.max_image_pixels, reduce_side(pp.backbone))
        kw = dict(max_batch=config.max_batch_size, max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
                  on_batch=self.metrics.observe_batch)
        self.posts = Batcher("posts", self._run_posts, self.executor, **kw)
        self.features = Batcher("features", self._run_features, self.executor, **kw)
        self.metrics.track_queues({"posts": self.posts, "features": self.features})
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.draining = False
        self.ready = True
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    # runs on the inference thread: the images are decoded already (PPM copies)
    def _run_posts(self, items: list[inputs.CheckedPost]) -> list[dict]:
        return self.pp.predict_posts([(p.text, p.decoded) for p in items])

    def _run_features(self, items: list[tuple]) -> list[tuple]:
        """items: ``(text vector | None, image vector | None, explain)``; explanations are computed
        for the whole batch when any of its requests asked for them."""
        d, n = self.pp.predictor.dim, len(items)
        text, image = np.zeros((n, d), np.float32), np.zeros((n, d), np.float32)
        tm, im = np.zeros(n, bool), np.zeros(n, bool)
        for r, (t, i, _) in enumerate(items):
            if t is not None:
                text[r], tm[r] = t, True
            if i is not None:
                image[r], im[r] = i, True
        kw = {"explain": True} if any(x[2] for x in items) else {}
        pr = self.pp.predictor.predict_features(text, image, tm, im, **kw)
        unc = getattr(pr, "uncertain", None)
        expl = getattr(pr, "explanations", None)
        return [(pr.probs[r], None if unc is None else bool(unc[r]),
                 None if expl is None or not items[r][2] else expl[r]) for r in range(n)]

    # draining (SIGTERM): new requests get 503, in-flight ones finish
    def enter(self) -> None:
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait (at most ``timeout`` s) for in-flight ones. True if all finished."""
        self.draining, self.ready = True, False
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except (asyncio.TimeoutError, TimeoutError):
            return self.in_flight == 0

    async def close(self) -> None:
        await self.posts.stop()
        await self.features.stop()
        self.decoder.close()
        self.executor.shutdown(wait=True)

    async def submit(self, batcher: Batcher, items: list):
        try:
            return await batcher.submit(items)
        except QueueFull as e:
            raise ApiError(503, "queue_full", f"The server is busy ({e.depth} posts waiting). Retry in "
                           f"{e.retry_after} s.", limit=e.limit, headers={"Retry-After": str(e.retry_after)},
                           hint="server flag --max-queue") from None


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
    """A PostPredictor result -> the API's answer (image indices as the client sent them)."""
    pre = f"{post.field}." if post.field else ""
    for j, reason in res.get("image_rejects") or []:   # decoded already: only if the predictor refuses one
        img = inputs.ImageIn(post.used[j], f"{pre}images[{post.used[j]}]", str(post.decoded[j]), b"")
        if post.on_bad_image == "error":
            post.bad(img, inputs.decode_failure(reason))     # raises; with 'skip' the warning is the predictor's
    idx = res["image_index"]
    index: Any = [post.used[i] for i in idx] if isinstance(idx, list) else (None if idx is None else post.used[idx])
    name: Any = [post.names[i] for i in idx] if isinstance(idx, list) else (None if idx is None else post.names[idx])
    warns = post.skipped + list(res["warnings"])
    return {"label": res["label"], "prob": res["prob"], "probs": res["probs"],
            "uncertain": _uncertain(res["prob"], post.min_confidence, res.get("uncertain")),
            "explanation": _plain(res.get("explanation")), "text_used": res["text_used"], "image_index": index,
            "image_name": name, "text_mask": res["text_mask"], "image_mask": res["image_mask"], "warnings": warns}


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


def _run_info(pp) -> dict:
    """Training facts for /v1/model: run.json's metrics and the evaluation reports, no paths."""
    import json

    from sgmft.runs import locate

    _, run = locate(pp.predictor.info.get("path", "."))
    d = run.read_run_json() if run is not None else None
    if d is None:
        return {}
    info: dict[str, Any] = {"training": {k: d[k] for k in ("preset", "best_val_acc", "epochs_run", "num_train",
                                                          "num_val", "num_test", "seconds") if k in d}}
    evals = {}
    for m in sorted(run.root.glob("eval-*/metrics.json")):
        try:
            md = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(md, dict):
            evals[m.parent.name[len("eval-"):]] = {k: md[k] for k in ("accuracy", "macro_f1", "num_samples") if k in md}
    if evals:
        info["evaluation"] = evals
    info["run"] = run.root.name
    return info


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


def _handlers(app) -> None:
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


def _predict_routes(app, svc: Service) -> None:
    cfg, pp = svc.cfg, svc.pp

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
        top = int(np.argmax(pr))
        out.append({"label": names[top], "prob": float(pr[top]), "probs": dict(zip(names, pr.tolist())),
                    "uncertain": _uncertain(float(pr[top]), mc, unc), "explanation": _plain(expl),
                    "text_mask": t is not None, "image_mask": im is not None, "warnings": warn})
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


def _service_routes(app, svc: Service) -> None:
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

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


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
    _handlers(app)
    _predict_routes(app, svc)
    _service_routes(app, svc)

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
    """Load a run (``PostPredictor.load(run_dir, **load_kw)``) and wrap it in an app."""
    from sgmft.predict import PostPredictor

    return create_app(PostPredictor.load(run_dir, **load_kw), config)


__all__ = ["PostIn", "PredictionOut", "Service", "create_app", "load_app", "model_info"]

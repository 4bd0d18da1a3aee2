"""The FastAPI application: endpoints, limits, dynamic batching, metrics, draining.

``create_app(post_predictor, config)`` wraps a loaded :class:`PostPredictor` (the same
object ``sgmft predict`` uses); ``load_app(run_dir, ...)`` loads one first. Endpoints
(docs/serve.md): ``POST /v1/predict`` (multipart or base64 JSON), ``POST
/v1/predict/batch``, ``POST /v1/predict/features``, ``GET /v1/model``, ``GET
/v1/health``, ``GET /v1/ready``, ``GET /metrics``, the OpenAPI docs at ``/docs`` (Swagger
UI served from the ``fastapi-offline`` package, no CDN) and the page at ``/``.

Requests carry images as bytes only (uploads or base64); nothing in a request is ever
used as a path on the server.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import binascii
import io
import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from sgmft.serve.batching import Batcher, QueueFull
from sgmft.serve.config import ServeConfig
from sgmft.serve.errors import ApiError, from_validation, too_large
from sgmft.serve.metrics import Metrics

STATIC = Path(__file__).parent / "static"
API_VERSION = "v1"


# -- request / response schemas (also the OpenAPI docs) ------------------------------------------
class PostIn(BaseModel):
    """One raw post. ``images``: base64 strings (a ``data:image/...;base64,`` prefix is allowed)."""
    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="the post's raw text (may be empty when it has images)")
    images: list[str] = Field(default_factory=list, description="base64-encoded image files")
    on_bad_image: Literal["error", "skip"] = Field(
        "error", description="an image that cannot be decoded: 'error' = 422; 'skip' = predict without it "
                             "and report it in warnings")


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    posts: list[PostIn]


class FeaturePostIn(BaseModel):
    """One post as feature vectors from the run's backbone (L2-normalised, length D); null = missing."""
    model_config = ConfigDict(extra="forbid")
    text: Optional[list[float]] = None
    image: Optional[list[float]] = None


class FeaturesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    posts: list[FeaturePostIn]


class PredictionOut(BaseModel):
    label: str = Field(description="the most probable place")
    prob: float
    probs: dict[str, float] = Field(description="every place's probability, in the model's label order")
    text_used: str = Field(description="the cleaned text the model saw ('' = none)")
    image_index: Union[int, list[int], None] = Field(
        description="which of the post's images the image vector came from (a list with image choice 'mean')")
    image_name: Union[str, list[str], None]
    text_mask: bool
    image_mask: bool
    warnings: list[str]


class BatchOut(BaseModel):
    predictions: list[PredictionOut]


class FeaturePredictionOut(BaseModel):
    label: str
    prob: float
    probs: dict[str, float]
    text_mask: bool
    image_mask: bool
    warnings: list[str]


class FeaturesOut(BaseModel):
    predictions: list[FeaturePredictionOut]


class ErrorOut(BaseModel):
    error: dict[str, Any]


_ERRORS = {s: {"model": ErrorOut} for s in (400, 413, 415, 422, 503)}


# -- the service state ---------------------------------------------------------------------------
class _Post:
    __slots__ = ("text", "images", "on_bad_image", "field")

    def __init__(self, text: str, images: list, on_bad_image: str, field: str):
        self.text, self.images, self.on_bad_image, self.field = text, images, on_bad_image, field


class Service:
    """Everything an app instance shares: the predictor, the batchers, metrics, draining."""

    def __init__(self, pp, config: ServeConfig, run_info: dict):
        self.pp, self.cfg, self.run_info = pp, config, run_info
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgmft-infer")
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

    # runs on the inference thread
    def _run_posts(self, items: list[_Post]) -> list[dict]:
        return self.pp.predict_posts([(p.text, p.images) for p in items])

    def _run_features(self, items: list[tuple]) -> list[np.ndarray]:
        d = self.pp.predictor.dim
        n = len(items)
        text, image = np.zeros((n, d), np.float32), np.zeros((n, d), np.float32)
        tm, im = np.zeros(n, bool), np.zeros(n, bool)
        for r, (t, i) in enumerate(items):
            if t is not None:
                text[r], tm[r] = t, True
            if i is not None:
                image[r], im[r] = i, True
        return list(self.pp.predictor.predict_features(text, image, tm, im).probs)

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
        self.draining = True
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
        self.executor.shutdown(wait=True)


# -- ASGI middleware: draining, body limit, metrics ----------------------------------------------
_ALWAYS_OPEN = {"/v1/health", "/v1/ready", "/metrics"}


class _BodyTooLarge(Exception):
    pass


class Guard:
    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc, path = self.service, scope["path"]
        endpoint = svc.metrics.endpoint_label(path)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        async def reply(err: ApiError):
            await err.response()(scope, receive, send_wrapped)

        if path in _ALWAYS_OPEN:
            await self.app(scope, receive, send_wrapped)
            svc.metrics.observe_request(endpoint, status["code"], time.perf_counter() - t0)
            return
        if svc.draining:
            await reply(ApiError(503, "shutting_down", "the server is shutting down; retry on another instance",
                                 headers={"Retry-After": "5", "Connection": "close"}))
            svc.metrics.observe_request(endpoint, 503, time.perf_counter() - t0)
            return
        limit = svc.cfg.max_body_bytes
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        svc.enter()
        try:
            if declared > limit:
                await reply(too_large("body", "body size", declared, limit, "--max-body-bytes"))
                return
            seen = 0

            async def receive_limited():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge()
                return msg

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except _BodyTooLarge:
                if status["code"] == 500:
                    await reply(too_large("body", "body size", seen, limit, "--max-body-bytes"))
        finally:
            svc.leave()
            svc.metrics.observe_request(endpoint, status["code"], time.perf_counter() - t0)


# -- input checks ------------------------------------------------------------------------------
def _check_text(text: str, field: str, cfg: ServeConfig) -> None:
    if len(text) > cfg.max_text_chars:
        raise ApiError(422, "text_too_long", f"{field}: {len(text)} characters, over the limit of "
                       f"{cfg.max_text_chars} (server flag --max-text-chars)", field=field, limit=cfg.max_text_chars)


def _check_count(n: int, field: str, cfg: ServeConfig) -> None:
    if n > cfg.max_images_per_post:
        raise ApiError(422, "too_many_images", f"{field}: {n} images, over the limit of {cfg.max_images_per_post} "
                       "per post (server flag --max-images-per-post)", field=field, limit=cfg.max_images_per_post)


def _check_image(data: bytes, field: str, cfg: ServeConfig) -> None:
    """Size, format and pixel count from the header, before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > cfg.max_image_bytes:
        raise too_large(field, "image size", len(data), cfg.max_image_bytes, "--max-image-bytes")
    if not data:
        raise ApiError(422, "empty_image", f"{field}: empty file (0 bytes)", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_pixels_too_large", f"{field}: decompression bomb refused ({e})", field=field,
                       limit=cfg.max_image_pixels) from None
    except UnidentifiedImageError:
        raise ApiError(422, "not_an_image", f"{field}: not an image (unidentified format)", field=field) from None
    except Exception as e:  # noqa: BLE001 - a broken header is the client's problem, never a 500
        raise ApiError(422, "corrupt_image", f"{field}: corrupt image header ({e or type(e).__name__})",
                       field=field) from None
    if w * h > cfg.max_image_pixels:
        raise ApiError(413, "image_pixels_too_large", f"{field}: {w}x{h} = {w * h} pixels, over the limit of "
                       f"{cfg.max_image_pixels} (server flag --max-image-pixels; possible decompression bomb)",
                       field=field, limit=cfg.max_image_pixels)


def _b64(s: str, field: str, cfg: ServeConfig) -> bytes:
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(422, "bad_base64", f"{field}: a data URL must be 'data:<type>;base64,<data>'",
                           field=field)
    if len(s) * 3 // 4 > cfg.max_image_bytes + 3:
        raise too_large(field, "image size", len(s) * 3 // 4, cfg.max_image_bytes, "--max-image-bytes")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "bad_base64", f"{field}: not valid base64 ({e}); images are sent as base64-encoded "
                       "file contents, never as paths", field=field) from None


def _post_from_json(p: PostIn, field: str, cfg: ServeConfig) -> _Post:
    from sgmft.ingest.images import ImageBytes

    pre = f"{field}." if field else ""
    _check_text(p.text, f"{pre}text", cfg)
    _check_count(len(p.images), f"{pre}images", cfg)
    images = []
    for j, s in enumerate(p.images):
        f = f"{pre}images[{j}]"
        data = _b64(s, f, cfg)
        _check_image(data, f, cfg)
        images.append(ImageBytes(data, f))
    return _Post(p.text, images, p.on_bad_image, field)


async def _post_from_form(request: Request, cfg: ServeConfig) -> _Post:
    from sgmft.ingest.images import ImageBytes

    try:
        form = await request.form(max_files=max(1000, cfg.max_images_per_post + 1), max_fields=1000)
    except StarletteHTTPException as e:
        raise ApiError(400, "malformed_multipart", f"body: {e.detail}", field="body") from None
    try:
        keys = set(form.keys())
        unknown = sorted(keys - {"text", "images", "on_bad_image"})
        if unknown:
            raise ApiError(422, "unknown_field", f"{unknown[0]}: unknown field (expected text, images, "
                           "on_bad_image)", field=unknown[0])
        texts = form.getlist("text")
        if not texts:
            raise ApiError(422, "missing_field", "text: this field is required (it may be empty)", field="text")
        if len(texts) > 1 or not isinstance(texts[0], str):
            raise ApiError(422, "wrong_type", "text: expected one text field, not a file or several", field="text")
        text = texts[0]
        mode = form.get("on_bad_image", "error")
        if mode not in ("error", "skip"):
            raise ApiError(422, "invalid_value", "on_bad_image: must be 'error' or 'skip'", field="on_bad_image")
        _check_text(text, "text", cfg)
        files = form.getlist("images")
        _check_count(len(files), "images", cfg)
        images = []
        for j, up in enumerate(files):
            f = f"images[{j}]"
            if not isinstance(up, UploadFile):
                raise ApiError(422, "wrong_type", f"{f}: expected a file upload, got a text field; images are "
                               "uploaded as files, never given as paths", field=f)
            if up.size is not None and up.size > cfg.max_image_bytes:
                raise too_large(f, "image size", up.size, cfg.max_image_bytes, "--max-image-bytes")
            data = await up.read(cfg.max_image_bytes + 1)
            _check_image(data, f, cfg)
            images.append(ImageBytes(data, _display_name(up.filename, j)))
        return _Post(text, images, mode, "")
    finally:
        await form.close()


def _display_name(filename: str | None, j: int) -> str:
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:120] if name else f"image {j + 1}"


def _parse_json(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation(e.errors(include_url=False)) from None


def _prediction(res: dict, post: _Post) -> dict:
    """A PostPredictor result -> the API's answer; a bad image is a 422 unless the post said 'skip'."""
    rejects = res.get("image_rejects") or []
    if rejects and post.on_bad_image == "error":
        j, reason = rejects[0]
        pre = f"{post.field}." if post.field else ""
        code = "truncated_image" if "truncated" in reason else (
            "image_pixels_too_large" if "pixels" in reason or "bomb" in reason else "corrupt_image")
        raise ApiError(413 if code == "image_pixels_too_large" else 422, code,
                       f"{_named(f'{pre}images[{j}]', post.images[j].name)}: {reason} (send on_bad_image='skip' to "
                       "predict without it)", field=f"{pre}images[{j}]")
    return {"label": res["label"], "prob": res["prob"], "probs": res["probs"], "text_used": res["text_used"],
            "image_index": res["image_index"], "image_name": res["image_used"], "text_mask": res["text_mask"],
            "image_mask": res["image_mask"], "warnings": res["warnings"]}


def _named(field: str, name: str) -> str:
    return field if name == field else f"{field} ({name})"


def _run_info(pp) -> dict:
    """Training facts for /v1/model: run.json's metrics and the evaluation reports, no paths."""
    from sgmft.runs import locate

    _, run = locate(pp.predictor.info.get("path", "."))
    info: dict[str, Any] = {}
    d = run.read_run_json() if run is not None else None
    if d is None:
        return info
    info["training"] = {k: d[k] for k in ("preset", "best_val_acc", "epochs_run", "num_train", "num_val", "num_test",
                                         "seconds") if k in d}
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


# -- the app -------------------------------------------------------------------------------------

def _check_batch_size(n: int, cfg) -> None:
    """422 when a batch request carries more posts than ``--max-batch-posts``."""
    if n > cfg.max_batch_posts:
        raise ApiError(422, "too_many_posts", f"posts: {n} posts, over the limit of "
                       f"{cfg.max_batch_posts} (server flag --max-batch-posts)", field="posts",
                       limit=cfg.max_batch_posts)


def create_app(pp, config: ServeConfig | None = None) -> "FastAPIOffline":
    """A FastAPI app serving ``pp`` (a loaded :class:`~sgmft.predict.PostPredictor`)."""
    cfg = config or ServeConfig()
    svc = Service(pp, cfg, _run_info(pp))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await svc.close()

    app = FastAPIOffline(
        title="sgmft", version=API_VERSION, lifespan=lifespan, redoc_url=None,
        description="Semantic place of social-media posts (text + images) with a trained SG-MFT run. "
                    "Errors are JSON: {\"error\": {\"code\", \"message\", \"field\", \"limit\"}}.")
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return ApiError(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    async def submit(batcher: Batcher, items: list):
        try:
            return await batcher.submit(items)
        except QueueFull as e:
            raise ApiError(503, "queue_full", f"{e}; retry after {e.retry_after} s (server flag --max-queue)",
                           limit=e.limit, headers={"Retry-After": str(e.retry_after)}) from None

    # -- predict -------------------------------------------------------------------------------
    post_schema = PostIn.model_json_schema()
    form_schema = {"type": "object", "required": ["text"], "properties": {
        "text": {"type": "string", "description": "the post's raw text (may be empty)"},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "image files (repeat the field)"},
        "on_bad_image": {"type": "string", "enum": ["error", "skip"], "default": "error"}}}

    @app.post("/v1/predict", response_model=PredictionOut, responses=_ERRORS, tags=["predict"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": form_schema},
                  "application/json": {"schema": post_schema}}}})
    async def predict(request: Request):
        """One raw post: text plus zero or more images, as a multipart upload or base64 JSON."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            post = await _post_from_form(request, cfg)
        elif ctype in ("application/json", ""):
            post = _post_from_json(_parse_json(PostIn, await request.body()), "", cfg)
        else:
            raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype!r}: send multipart/form-data "
                           "or application/json", field="content-type")
        (res,) = await submit(svc.posts, [post])
        return _prediction(res, post)

    @app.post("/v1/predict/batch", response_model=BatchOut, responses=_ERRORS, tags=["predict"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": BatchIn.model_json_schema()}}}})
    async def predict_batch(request: Request):
        """Several raw posts (JSON, images in base64), at most ``--max-batch-posts``."""
        body = _parse_json(BatchIn, await request.body())
        _check_batch_size(len(body.posts), cfg)
        posts = [_post_from_json(p, f"posts[{i}]", cfg) for i, p in enumerate(body.posts)]
        res = await submit(svc.posts, posts)
        return {"predictions": [_prediction(r, p) for r, p in zip(res, posts)]}

    @app.post("/v1/predict/features", response_model=FeaturesOut, responses=_ERRORS, tags=["predict"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": FeaturesIn.model_json_schema()}}}})
    async def predict_features(request: Request):
        """Posts as D-vectors from the run's backbone (for clients that run the encoder themselves)."""
        body = _parse_json(FeaturesIn, await request.body())
        _check_batch_size(len(body.posts), cfg)
        d = pp.predictor.dim
        items, notes = [], []
        for i, p in enumerate(body.posts):
            vecs, warn = [], []
            for name in ("text", "image"):
                v = getattr(p, name)
                if v is None:
                    vecs.append(None)
                    continue
                a = np.asarray(v, np.float32)
                if a.shape != (d,):
                    raise ApiError(422, "wrong_dimension", f"posts[{i}].{name}: {a.size} values, the model "
                                   f"expects D={d}", field=f"posts[{i}].{name}", limit=d)
                if not np.isfinite(a).all():
                    raise ApiError(422, "invalid_value", f"posts[{i}].{name}: NaN or infinite values",
                                   field=f"posts[{i}].{name}")
                norm = float(np.linalg.norm(a))
                if abs(norm - 1) > 1e-2:
                    warn.append(f"{name} vector has norm {norm:.3g}; the model was trained on L2-normalised "
                                "backbone features")
                vecs.append(a)
            if vecs[0] is None and vecs[1] is None:
                warn.append("no text or image vector: the prediction is the model's answer for an empty post")
            items.append(tuple(vecs))
            notes.append(warn)
        probs = await submit(svc.features, items)
        names = pp.label_names
        out = []
        for (t, im), pr, warn in zip(items, probs, notes):
            top = int(np.argmax(pr))
            out.append({"label": names[top], "prob": float(pr[top]),
                        "probs": {n: float(x) for n, x in zip(names, pr)},
                        "text_mask": t is not None, "image_mask": im is not None, "warnings": warn})
        return {"predictions": out}

    # -- about the model, probes, metrics ------------------------------------------------------
    @app.get("/v1/model", tags=["service"])
    async def model_info():
        """Label names, backbone, D, preset and the training metrics of the run."""
        return {"labels": pp.label_names, "backbone": pp.backbone.spec, "dim": pp.backbone.dim,
                "preset": pp.predictor.info.get("preset") or svc.run_info.get("training", {}).get("preset", ""),
                "image_choice": pp.image_choice, "clean_config": dataclasses.asdict(pp.cleaner.cfg),
                "notes": list(pp.notes),
                **svc.run_info,
                "limits": {k: getattr(cfg, k) for k in ("max_body_bytes", "max_image_bytes", "max_image_pixels",
                                                        "max_images_per_post", "max_text_chars",
                                                        "max_batch_posts")}}

    @app.get("/v1/health", tags=["service"])
    async def health():
        """Liveness: 200 while the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/v1/ready", tags=["service"])
    async def ready():
        """Readiness: 200 when the model is loaded and the server takes requests; 503 while draining."""
        if svc.draining or not svc.ready:
            return JSONResponse({"status": "draining" if svc.draining else "starting"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        body, ctype = svc.metrics.render()
        return Response(body, media_type=ctype)

    # -- the page ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, service=svc)
    return app


def load_app(run_dir, config: ServeConfig | None = None, **load_kw):
    """Load a run (``PostPredictor.load(run_dir, **load_kw)``) and wrap it in an app."""
    from sgmft.predict import PostPredictor

    return create_app(PostPredictor.load(run_dir, **load_kw), config)


__all__ = ["PostIn", "PredictionOut", "Service", "create_app", "load_app"]

"""What a request carries, checked before any work: text, images from their headers, and the
decoding of the images in a bounded pool off the inference thread.

One post of a request goes through :func:`read_image` for each image (size in bytes, then
format and size in pixels from the header: nothing is decoded), then the request's pixels
are added up against ``--max-request-pixels`` (:class:`PixelBudget`), then
:class:`Decoder` decodes the images in its own threads (``--decode-workers``). The
inference thread then only reads a raw PPM copy of each decoded image, so one request with
many large images cannot hold it for seconds.

A bad image (not an image, empty, truncated, corrupt, over a per-image limit) is a
:class:`BadImage`: with ``on_bad_image="error"`` it is answered at once (422 or 413), with
``"skip"`` the post is predicted without it and a warning names it. One code per cause,
whichever way the image came (multipart, base64 JSON, batch).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sgmft.errors import ImageLoadError
from sgmft.ingest.images import ImageBytes, load_image_bytes
from sgmft.serve.config import ServeConfig
from sgmft.serve.errors import ApiError, human_bytes

_SKIP_HINT = "send on_bad_image='skip' (on the page: tick 'skip unreadable images') to predict without it"


@dataclass
class BadImage:
    """An image that cannot be used, with its cause (one ``code`` per cause)."""
    status: int
    code: str
    reason: str                 # a phrase: "is not an image file"
    todo: str                   # what to do: "Send a JPEG, PNG, ... or leave it out."
    limit: int | None = None
    hint: str | None = None


@dataclass
class ImageIn:
    index: int                  # position in the post's list, as sent
    field: str                  # images[1], posts[3].images[1]
    where: str                  # "image 2 (wide.png)" / "image 2 of post 4": for a person
    data: bytes
    name: str = ""              # the upload's file name, or "image N": what the answer calls it
    pixels: int = 0


@dataclass
class CheckedPost:
    """One post of a request, checked: what the batcher and the answer need."""
    text: str
    field: str                  # "" for /v1/predict, "posts[3]" in a batch
    on_bad_image: str
    min_confidence: float | None
    images: list[ImageIn] = field(default_factory=list)        # usable so far
    skipped: list[str] = field(default_factory=list)           # warnings for images left out
    decoded: list[ImageBytes] = field(default_factory=list)    # PPM copies, in the order of ``used``
    used: list[int] = field(default_factory=list)              # original index of each decoded image
    names: list[str] = field(default_factory=list)             # and its name

    def bad(self, img: ImageIn, b: BadImage) -> None:
        """Skip ``img`` with a warning, or answer the request with the error (``on_bad_image``)."""
        if self.on_bad_image == "skip":
            self.skipped.append(f"{img.where} not used: it {b.reason}")
            return
        hint = "; ".join(h for h in (b.hint, _SKIP_HINT) if h)
        raise ApiError(b.status, b.code, f"{img.where[0].upper()}{img.where[1:]} {b.reason}. {b.todo}",
                       field=img.field, limit=b.limit, hint=hint)


def check_text(text: str, field_: str, cfg: ServeConfig) -> None:
    if len(text) > cfg.max_text_chars:
        raise ApiError(422, "text_too_long", f"The text ({field_}) has {len(text)} characters; the limit is "
                       f"{cfg.max_text_chars}. Shorten it.", field=field_, limit=cfg.max_text_chars,
                       hint="server flag --max-text-chars")


def check_count(n: int, field_: str, cfg: ServeConfig) -> None:
    if n > cfg.max_images_per_post:
        raise ApiError(422, "too_many_images", f"{n} images in one post ({field_}); at most "
                       f"{cfg.max_images_per_post} are allowed. Leave some out.", field=field_,
                       limit=cfg.max_images_per_post, hint="server flag --max-images-per-post")


def check_min_confidence(v, field_: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if not 0.0 <= x <= 1.0:
        raise ApiError(422, "invalid_value", f"{field_} must be a number from 0 to 1, got {v!r}.", field=field_)
    return x


_BOMB = re.compile(r"\((\d+) pixels\)")


def header_check(data: bytes, cfg: ServeConfig) -> tuple[int, BadImage | None]:
    """``(pixels, None)`` from the image header (nothing decoded), or ``(0, BadImage)``."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > cfg.max_image_bytes:
        return 0, BadImage(413, "image_size_too_large", f"is {human_bytes(len(data))}; the limit is "
                           f"{human_bytes(cfg.max_image_bytes)} per image", "Send a smaller file.",
                           cfg.max_image_bytes, "server flag --max-image-bytes")
    if not data:
        return 0, BadImage(422, "empty_image", "is empty (0 bytes)", "Choose the file again, or leave it out.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:   # PIL's own limit is far above ours: report ours
        m = _BOMB.search(str(e))
        n = f"{int(m.group(1)):,} pixels" if m else "more pixels than PIL opens"
        return 0, _too_many_pixels(n, cfg)
    except UnidentifiedImageError:
        return 0, BadImage(422, "not_an_image", "is not an image file (its format is not recognised)",
                           "Send a JPEG, PNG, GIF, WebP or BMP file, or leave it out.")
    except Exception as e:  # noqa: BLE001 - a broken header is the client's problem, never a 500
        return 0, BadImage(422, "corrupt_image", f"is damaged: its header cannot be read ({e or type(e).__name__})",
                           "Send another copy of the picture, or leave it out.")
    if w * h > cfg.max_image_pixels:
        return 0, _too_many_pixels(f"{w}x{h} = {w * h:,} pixels", cfg)
    if w <= 0 or h <= 0:
        return 0, BadImage(422, "corrupt_image", f"is damaged: its header says {w}x{h} pixels",
                           "Send another copy of the picture, or leave it out.")
    return w * h, None


def _too_many_pixels(n: str, cfg: ServeConfig) -> BadImage:
    return BadImage(413, "image_pixels_too_large", f"is {n}; the limit is {cfg.max_image_pixels:,} pixels per "
                    "image", "Send a smaller version of the picture.", cfg.max_image_pixels,
                    "server flag --max-image-pixels (decompression bombs stop here, before decoding)")


def b64_image(s: str, field_: str, where: str, cfg: ServeConfig) -> bytes | BadImage:
    """Bytes of a base64 image (a ``data:`` URL, and MIME line breaks, are allowed).

    A string that is not base64 is a malformed request (422 ``bad_base64``), never a path;
    bytes over the size limit are a bad image (skippable)."""
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(422, "bad_base64", f"{where[0].upper()}{where[1:]} is a data URL that is not "
                           "'data:<type>;base64,<data>'. Send the file's bytes in base64.", field=field_)
    if len(s) * 3 // 4 > cfg.max_image_bytes + 3 + len(s) // 76 * 2:
        n = len(s) * 3 // 4
        return BadImage(413, "image_size_too_large", f"is about {human_bytes(n)}; the limit is "
                        f"{human_bytes(cfg.max_image_bytes)} per image", "Send a smaller file.",
                        cfg.max_image_bytes, "server flag --max-image-bytes")
    if "\n" in s or "\r" in s or " " in s or "\t" in s:
        s = "".join(s.split())            # base64 wrapped at 76 columns (the MIME form)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "bad_base64", f"{where[0].upper()}{where[1:]} is not valid base64 ({e}). Images are "
                       "sent as base64-encoded file contents, never as paths.", field=field_) from None


class PixelBudget:
    """The pixels of a request's images, added up from their headers as they are read: the
    request is refused (413) as soon as the sum passes ``--max-request-pixels``, before the
    rest of its images are even base64-decoded, and before anything is decoded."""

    def __init__(self, cfg: ServeConfig, batch: bool = False):
        self.cfg, self.batch, self.total = cfg, batch, 0

    def add(self, pixels: int, where: str) -> None:
        self.total += pixels
        limit = self.cfg.max_request_pixels
        if self.total > limit:
            raise ApiError(413, "request_pixels_too_large", f"The images of this request have over {limit:,} "
                           f"pixels in all ({self.total:,} up to {where}); the limit is {limit:,} per request. "
                           "Send fewer or smaller images" + (", or split the batch." if self.batch else "."),
                           field="body", limit=limit, hint="server flag --max-request-pixels")


class Decoder:
    """Decodes images in ``workers`` threads (never on the inference thread).

    Each image is decoded as the predictor would (EXIF orientation, RGB, reduced to the
    backbone's side: :func:`~sgmft.ingest.images.load_image_bytes`) and handed on as an
    uncompressed PPM, which the inference thread reads back bit for bit in a memcpy's time.
    The images of one request are decoded one after another, so one heavy request holds at
    most one worker and small requests keep flowing through the others."""

    def __init__(self, workers: int, max_pixels: int, reduce_to: int | None):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sgmft-decode")
        self.max_pixels, self.reduce_to = max_pixels, reduce_to

    def _one(self, data: bytes, name: str) -> bytes | ImageLoadError:
        try:
            im = load_image_bytes(ImageBytes(data, name), max_pixels=self.max_pixels, reduce_to=self.reduce_to)
        except ImageLoadError as e:
            return e
        buf = io.BytesIO()
        im.save(buf, "PPM")
        return buf.getvalue()

    async def decode(self, posts: list[CheckedPost]) -> None:
        """Fill each post's ``decoded``/``used``; a failed image goes through ``post.bad``."""
        loop = asyncio.get_running_loop()
        for p in posts:
            for img in p.images:
                out = await loop.run_in_executor(self.pool, self._one, img.data, img.where)
                if isinstance(out, ImageLoadError):
                    p.bad(img, decode_failure(out.reason))
                    continue
                p.decoded.append(ImageBytes(out, img.where))
                p.used.append(img.index)
                p.names.append(img.name)
            p.images = []            # the encoded bytes are no longer needed

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def decode_failure(reason: str) -> BadImage:
    """A decoding error (:class:`ImageLoadError` reason) -> its code and a sentence."""
    if "truncated" in reason:
        return BadImage(422, "truncated_image", "is incomplete (the file is cut off)",
                        "Send the whole file, or leave it out.")
    if "pixels" in reason or "bomb" in reason:
        return BadImage(413, "image_pixels_too_large", f"has too many pixels ({reason})",
                        "Send a smaller version of the picture.")
    if "empty" in reason:
        return BadImage(422, "empty_image", "is empty (0 bytes)", "Choose the file again, or leave it out.")
    if "not an image" in reason:
        return BadImage(422, "not_an_image", "is not an image file (its format is not recognised)",
                        "Send a JPEG, PNG, GIF, WebP or BMP file, or leave it out.")
    return BadImage(422, "corrupt_image", f"is damaged and cannot be decoded ({reason.removeprefix('corrupt image: ')})",
                    "Send another copy of the picture, or leave it out.")


# -- requests -> posts ---------------------------------------------------------------------------
def _where(j: int, post_no: int | None, name: str | None) -> str:
    s = f"image {j + 1}" + (f" of post {post_no + 1}" if post_no is not None else "")
    return f"{s} ({name})" if name else s


def add_image(post: CheckedPost, j: int, data: "bytes | BadImage", where: str, cfg: ServeConfig,
              budget: PixelBudget, name: str | None = None) -> None:
    pre = f"{post.field}." if post.field else ""
    img = ImageIn(j, f"{pre}images[{j}]", where, data if isinstance(data, bytes) else b"", name or f"image {j + 1}")
    if isinstance(data, BadImage):
        post.bad(img, data)
        return
    img.pixels, bad = header_check(data, cfg)
    if bad is not None:
        post.bad(img, bad)
    else:
        budget.add(img.pixels, where)
        post.images.append(img)


def post_from_json(p, post_no: int | None, cfg: ServeConfig, budget: PixelBudget,
                   min_confidence: float | None = None) -> CheckedPost:
    """A validated :class:`~sgmft.serve.schemas.PostIn` -> a checked post (``post_no``: its index in a batch)."""
    pre = f"posts[{post_no}]" if post_no is not None else ""
    dot = f"{pre}." if pre else ""
    check_text(p.text, f"{dot}text", cfg)
    check_count(len(p.images), f"{dot}images", cfg)
    mc = p.min_confidence if getattr(p, "min_confidence", None) is not None else min_confidence
    post = CheckedPost(p.text, pre, p.on_bad_image, mc)
    for j, s in enumerate(p.images):
        where = _where(j, post_no, None)
        add_image(post, j, b64_image(s, f"{dot}images[{j}]", where, cfg), where, cfg, budget)
    return post


FORM_FIELDS = ("text", "images", "on_bad_image", "min_confidence")


async def post_from_form(request, cfg: ServeConfig) -> CheckedPost:
    """A multipart (or url-encoded) /v1/predict -> a checked post."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    try:   # max_part_size: a long text is judged by --max-text-chars (422), not by the multipart parser
        form = await request.form(max_files=max_files(cfg), max_fields=100, max_part_size=cfg.max_body_bytes)
    except StarletteHTTPException as e:
        if "Too many files" in str(e.detail):
            raise ApiError(422, "too_many_images", f"More than {max_files(cfg)} files in one post; at most "
                           f"{cfg.max_images_per_post} images are allowed. Leave some out.", field="images",
                           limit=cfg.max_images_per_post, hint="server flag --max-images-per-post") from None
        raise ApiError(400, "malformed_multipart", f"The form cannot be read ({e.detail}). Send a "
                       "multipart/form-data body.", field="body") from None
    try:
        unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
        if unknown:
            raise ApiError(422, "unknown_field", f"{unknown[0]} is not a field of this request (expected "
                           f"{', '.join(FORM_FIELDS)}); check its spelling.", field=unknown[0])
        texts = form.getlist("text")
        if not texts:
            raise ApiError(422, "missing_field", "text is required (it may be empty).", field="text")
        if len(texts) > 1 or not isinstance(texts[0], str):
            raise ApiError(422, "wrong_type", "text has the wrong type: send one text field, not a file or "
                           "several.", field="text")
        mode = form.get("on_bad_image", "error")
        if mode not in ("error", "skip"):
            raise ApiError(422, "invalid_value", "on_bad_image must be 'error' or 'skip'.", field="on_bad_image")
        mc = check_min_confidence(form.get("min_confidence"), "min_confidence")
        check_text(texts[0], "text", cfg)
        files = form.getlist("images")
        check_count(len(files), "images", cfg)
        post, budget = CheckedPost(texts[0], "", mode, mc), PixelBudget(cfg)
        for j, up in enumerate(files):
            if not isinstance(up, UploadFile):
                raise ApiError(422, "wrong_type", f"images[{j}] is a text field; images are uploaded as files, "
                               "never given as paths.", field=f"images[{j}]")
            data = await up.read(cfg.max_image_bytes + 1)
            name = display_name(up.filename)
            add_image(post, j, data, _where(j, None, name), cfg, budget, name)
        return post
    finally:
        await form.close()


def display_name(filename: str | None) -> str | None:
    """The upload's file name without any folder (``None`` when it has none)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:120] or None


def max_files(cfg: ServeConfig) -> int:
    return 2 * cfg.max_images_per_post + 8

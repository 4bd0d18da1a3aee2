"""Robust image loading for raw social-media posts.

``load_image`` turns whatever a crawler saved into an RGB ``PIL.Image`` or raises
:class:`ImageLoadError` -- never anything else -- so a long extraction run can record a
reject for the file and carry on. Handled:

* EXIF orientation (``ImageOps.exif_transpose``), so phone photos are upright;
* every PIL mode: palette (``P``/``PA``), ``RGBA``/``LA`` (composited on white, not
  black), ``CMYK``, ``YCbCr``, ``1``, ``L``, 16/32-bit ``I;16*``/``I``/``F`` (rescaled
  from their actual range to 0..255);
* animated GIF/WebP/APNG: the first frame;
* decompression bombs: the pixel count in the header is checked against ``max_pixels``
  *before* any decoding; PIL's own ``DecompressionBombError`` (``Image.MAX_IMAGE_PIXELS``)
  is caught too and its warning silenced (our limit is the one that applies);
* zero-byte, truncated, corrupt and non-image files: ``ImageLoadError(path, reason)``;
* bounded memory (``reduce_to``): a large image is decoded at reduced size where the
  format allows it (JPEG ``draft``: the DCT scales 1/2, 1/4, 1/8) and otherwise reduced
  (``Image.reduce``, per axis) right after decoding, before any mode conversion, so that
  each side keeps at least ``reduce_to`` pixels (the backbones squash-resize to 224 px).
  Full-size decodes of all threads together are bounded by :data:`DECODE_BUDGET`
  (bytes); a decode waits for room instead of exceeding it. See docs/extract.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import warnings
from pathlib import Path
from struct import error as struct_error  # raised by some PIL plugins on bad headers

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sgmft.errors import ImageLoadError

# 64 Mpx: far above any real Weibo photo (<= ~40 Mpx from phones), far below what would
# exhaust memory (an RGB 64 Mpx image is 192 MiB).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


class ByteBudget:
    """A counting semaphore in bytes: ``with budget.hold(n): ...`` waits until ``n`` bytes
    are free (a request larger than the capacity waits for the budget to be empty, then
    takes all of it, so it can never dead-lock)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.used = 0
        self.peak = 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> int:
        n = max(0, min(int(n), self.capacity))
        with self._cv:
            while self.used + n > self.capacity:
                self._cv.wait()
            self.used += n
            self.peak = max(self.peak, self.used)
        return n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()

    @contextlib.contextmanager
    def hold(self, n: int):
        got = self.acquire(n)
        try:
            yield got
        finally:
            self.release(got)


# Full-size decodes in flight, all threads together (bytes, at 4 bytes per pixel): 512 MiB
# = two 64 Mpx images at once, or many small ones.
DECODE_BUDGET = ByteBudget(512 * 2**20)


def image_bytes_digest(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of the file's bytes (the image's identity in caches)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:
        raise ImageLoadError(path, f"cannot read file: {e.strerror or e}") from None
    return h.hexdigest()


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("P", "PA"):
        # Palette with transparency is expanded to RGBA first so the alpha is honoured.
        im = im.convert("RGBA") if (mode == "PA" or "transparency" in im.info) else im.convert("RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.min(a)), float(np.max(a))
        # 16-bit images usually use the full 0..65535 range; rescale what is actually there.
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, ...


class ImageBytes:
    """An image given as bytes (an upload), never a path: what the HTTP service passes on.

    ``name`` is only a label for messages (e.g. the upload's file name); nothing is read
    from the file system for it.
    """

    __slots__ = ("data", "name")

    def __init__(self, data: bytes, name: str = "upload"):
        self.data, self.name = bytes(data), str(name)

    def __repr__(self) -> str:
        return f"ImageBytes({self.name!r}, {len(self.data)} bytes)"

    def __str__(self) -> str:
        return self.name


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """Open ``path`` as an upright RGB image (first frame if animated).

    Raises :class:`ImageLoadError` for anything unusable; the returned image is fully
    decoded (the file is closed). ``reduce_to``: when given, an image wider or taller than
    ``2 * reduce_to`` is decoded/reduced (integer factor per axis) so that each side keeps
    at least ``reduce_to`` pixels; ``None`` = full size.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageLoadError(path, f"cannot read file: {e.strerror or e}") from None
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return _decode(path, path, max_pixels, reduce_to)


def load_image_bytes(img: ImageBytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     reduce_to: int | None = None) -> Image.Image:
    """:func:`load_image` for an in-memory image (same checks, same errors; ``path`` = its name)."""
    if not img.data:
        raise ImageLoadError(img.name, "empty file (0 bytes)")
    return _decode(io.BytesIO(img.data), img.name, max_pixels, reduce_to)


def load_any(src: "str | Path | ImageBytes", *, max_pixels: int = DEFAULT_MAX_PIXELS,
             reduce_to: int | None = None) -> Image.Image:
    """A path (:func:`load_image`) or an :class:`ImageBytes` (:func:`load_image_bytes`)."""
    if isinstance(src, ImageBytes):
        return load_image_bytes(src, max_pixels=max_pixels, reduce_to=reduce_to)
    return load_image(src, max_pixels=max_pixels, reduce_to=reduce_to)


def _factors(w: int, h: int, reduce_to: int | None) -> tuple[int, int]:
    """Integer reduction factor per axis keeping each side >= ``reduce_to`` (1 = keep)."""
    if not reduce_to:
        return 1, 1
    return max(1, w // reduce_to), max(1, h // reduce_to)


def _reduce(im: Image.Image, fx: int, fy: int) -> Image.Image:
    """``im`` reduced by (fx, fy) (box average; nearest for modes ``reduce`` lacks)."""
    if fx == 1 and fy == 1:
        return im
    try:
        return im.reduce((fx, fy))
    except ValueError:  # P, 1, I;16*: keep the mode (a palette cannot be averaged)
        return im.resize((max(1, im.width // fx), max(1, im.height // fy)), Image.NEAREST)


def _decode(src, path, max_pixels: int, reduce_to: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                w, h = im.size
                if w <= 0 or h <= 0:
                    raise ImageLoadError(path, f"invalid size {w}x{h}")
                if w * h > max_pixels:
                    raise ImageLoadError(
                        path, f"too many pixels ({w}x{h} = {w * h} > max_pixels={max_pixels}); "
                        "possible decompression bomb")
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                fx, fy = _factors(w, h, reduce_to)
                if (fx > 1 or fy > 1) and im.format == "JPEG":
                    # decode at 1/2, 1/4 or 1/8 scale: never below the requested size
                    im.draft(None, (-(-w // fx), -(-h // fy)))
                    fx, fy = _factors(*im.size, reduce_to)
                with DECODE_BUDGET.hold(4 * im.size[0] * im.size[1]):
                    im.load()
                    im = _reduce(im, fx, fy)
                im = ImageOps.exif_transpose(im)  # returns a copy when it rotates
                out = _to_rgb(im)
                if out is im:
                    out = im.copy()
                return out
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"decompression bomb refused by PIL: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError,
            TypeError, KeyError, struct_error) as e:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated",
        # "broken data stream"), SyntaxError (bad headers) or ValueError.
        msg = str(e) or type(e).__name__
        reason = "truncated image" if "truncated" in msg.lower() else f"corrupt image: {msg}"
        raise ImageLoadError(path, reason) from None


__all__ = ["DECODE_BUDGET", "DEFAULT_MAX_PIXELS", "ByteBudget", "ImageBytes", "ImageLoadError", "image_bytes_digest", "load_any", "load_image",
           "load_image_bytes"]

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
* zero-byte, truncated, corrupt and non-image files: ``ImageLoadError(path, reason)``.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from struct import error as struct_error  # raised by some PIL plugins on bad headers

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sgmft.errors import ImageLoadError

# 64 Mpx: far above any real Weibo photo (<= ~40 Mpx from phones), far below what would
# exhaust memory (an RGB 64 Mpx image is 192 MiB).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


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


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` as an upright RGB image (first frame if animated).

    Raises :class:`ImageLoadError` for anything unusable; the returned image is fully
    decoded (the file is closed).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageLoadError(path, f"cannot read file: {e.strerror or e}") from None
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return _decode(path, path, max_pixels)


def load_image_bytes(img: ImageBytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`load_image` for an in-memory image (same checks, same errors; ``path`` = its name)."""
    if not img.data:
        raise ImageLoadError(img.name, "empty file (0 bytes)")
    return _decode(io.BytesIO(img.data), img.name, max_pixels)


def load_any(src: "str | Path | ImageBytes", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path (:func:`load_image`) or an :class:`ImageBytes` (:func:`load_image_bytes`)."""
    if isinstance(src, ImageBytes):
        return load_image_bytes(src, max_pixels=max_pixels)
    return load_image(src, max_pixels=max_pixels)


def _decode(src, path, max_pixels: int) -> Image.Image:
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
                im.load()
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


__all__ = ["DEFAULT_MAX_PIXELS", "ImageBytes", "ImageLoadError", "image_bytes_digest", "load_any", "load_image",
           "load_image_bytes"]

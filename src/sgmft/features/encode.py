"""One path from raw posts to feature vectors, shared by ``sgmft extract`` and prediction.

A batch of posts goes through two stages:

1. :func:`prepare_batch` (CPU, thread-safe apart from the tokenizer, see ``tokenize_lock``):
   clean each text (:class:`~sgmft.ingest.text.TextCleaner`), load each image robustly
   (:func:`~sgmft.ingest.images.load_image`; a bad file becomes a reject and the post keeps
   its other images; with ``image_choice="first"`` later images are not even loaded), then
   tokenize the non-empty texts in one call and preprocess the usable images in chunks of
   ``backbone.batch_size``.
2. :func:`encode_prepared` (the model forward): one text forward, one image forward per
   chunk, then one image vector per post (:func:`choose_image`) and ``text_mask`` /
   ``image_mask`` False with a zero row where a modality is missing.

Batch extraction (:mod:`sgmft.features.extract`) runs stage 1 in a thread pool ahead of
stage 2 and caches the results; :class:`sgmft.predict.PostPredictor` calls
:func:`encode_posts` (both stages). The same batch of posts thus gets the same features
(bit for bit at equal thread counts) whichever way it is encoded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sgmft.errors import ImageLoadError
from sgmft.ingest.images import DEFAULT_MAX_PIXELS, ImageBytes, load_any
from sgmft.ingest.manifest import Post
from sgmft.ingest.text import TextCleaner

IMAGE_CHOICES = ("similar", "first", "mean")
# Images used per post; the rest of a post's list is rejected with a reason (an ordinary
# Weibo post shows at most 9). Bounds the memory of one post and one batch.
DEFAULT_MAX_IMAGES = 9
# Large images are decoded/reduced so that each side keeps at least this many pixels
# (the backbone's input side x 2, and never below this floor): see ingest.images.
MIN_REDUCE_SIDE = 448


def reduce_side(backbone) -> int:
    """The ``reduce_to`` of :func:`sgmft.ingest.images.load_image` for ``backbone``."""
    return max(MIN_REDUCE_SIDE, 2 * int(getattr(backbone, "image_size", 0) or 0))

__all__ = ["DEFAULT_MAX_IMAGES", "IMAGE_CHOICES", "MIN_REDUCE_SIDE", "reduce_side", "EncodedBatch", "PreparedBatch", "check_image_choice", "choose_image",
           "encode_posts", "encode_prepared", "prepare_batch"]


def check_image_choice(image_choice: str) -> str:
    if image_choice not in IMAGE_CHOICES:
        raise ValueError(f"image_choice must be one of {IMAGE_CHOICES}, got {image_choice!r}")
    return image_choice


def choose_image(choice: str, img: np.ndarray, txt: np.ndarray | None) -> tuple[np.ndarray, list[int]]:
    """One image vector for a post from its ``(k, D)`` candidates, and which rows it came from.

    ``"first"``: the first usable image; ``"mean"``: the L2-normalised mean; ``"similar"``:
    the image closest to the text (cosine; the first image when the post has no text).
    """
    if len(img) == 1 or choice == "first":
        return img[0], [0]
    if choice == "mean":
        m = img.astype(np.float64).mean(0)
        n = np.linalg.norm(m)
        return ((m / n).astype(np.float32), list(range(len(img)))) if n > 0 else (img[0], [0])
    if txt is None:  # 'similar' without usable text: fall back to the first usable image
        return img[0], [0]
    best = int(np.argmax(img.astype(np.float64) @ txt.astype(np.float64)))
    return img[best], [best]


def _shown(path: Path, base: Path | None) -> str:
    """``path`` relative to ``base`` where possible (for reject reasons)."""
    if base is None:
        return str(path)
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)


@dataclass
class PreparedBatch:
    """A batch of posts after the CPU stage, ready for the model forward."""

    texts: list[str] = field(default_factory=list)        # per post: cleaned text ("" = none)
    images: list[list[int]] = field(default_factory=list)  # per post: indices (into post.images) of usable images
    rejects: list[list] = field(default_factory=list)     # per post: [[image index, reason], ...]
    tokens: Any = None                                     # tokens of the non-empty texts
    pixels: list = field(default_factory=list)             # preprocessed usable images, in chunks

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared tensors (what a prefetched batch costs in memory)."""
        toks = self.tokens.values() if isinstance(self.tokens, dict) else ()
        return (sum(int(x.numel()) * x.element_size() for x in self.pixels)
                + sum(int(getattr(t, "numel", lambda: 0)()) * getattr(t, "element_size", lambda: 0)() for t in toks))


@dataclass
class EncodedBatch:
    """Features of a batch of posts, exactly as a feature store holds them."""

    text: np.ndarray                  # (N, D) float32, zero row where text_mask is False
    image: np.ndarray                 # (N, D) float32, zero row where image_mask is False
    text_mask: np.ndarray             # (N,) bool
    image_mask: np.ndarray            # (N,) bool
    texts_used: list[str]             # cleaned text per post ("" = none)
    images_used: list[list[int]]      # per post: indices (into post.images) the image vector came from
    rejects: list[list]               # per post: [[image index, reason], ...] of images that failed


def prepare_batch(backbone, cleaner: TextCleaner, posts: Sequence[Post], image_choice: str = "similar", *,
                  max_pixels: int = DEFAULT_MAX_PIXELS, base: Path | None = None, on_error: str = "skip",
                  tokenize_lock=None, max_images: int | None = DEFAULT_MAX_IMAGES,
                  reduce_to: int | None = 0) -> PreparedBatch:
    """The CPU stage: clean, load, tokenize, preprocess. ``base``: image paths in reject
    reasons are shown relative to it. ``tokenize_lock``: held around the tokenizer call
    (Hugging Face fast tokenizers are not safe to call from several threads).

    Memory is bounded by construction: a post's images beyond ``max_images`` are rejected
    with a reason (never opened); each image is decoded at reduced size (``reduce_to``,
    default :func:`reduce_side` of the backbone; ``None`` = full size) and a post's images
    are preprocessed as soon as they are decoded, so the decoded images of at most one
    post are alive at a time; a batch then holds only the fixed-size model inputs."""
    check_image_choice(image_choice)
    if reduce_to == 0:
        reduce_to = reduce_side(backbone)
    pr = PreparedBatch()
    tensors = []
    for p in posts:
        pr.texts.append(cleaner.clean(p.text))
        ims, rej = [], []
        srcs = list(p.images)
        if max_images is not None and len(srcs) > max_images:
            for j in range(max_images, len(srcs)):
                src = srcs[j]
                shown = src.name if isinstance(src, ImageBytes) else _shown(Path(src), base)
                rej.append([j, f"{shown}: not used: the post lists {len(srcs)} images, more than "
                               f"max_images={max_images} (--max-images)"])
            srcs = srcs[:max_images]
        for j, src in enumerate(srcs):   # paths, or ImageBytes (in-memory uploads, e.g. the HTTP service)
            try:
                ims.append((j, load_any(src, max_pixels=max_pixels, reduce_to=reduce_to)))
            except ImageLoadError as e:
                if on_error == "raise":
                    raise
                rej.append([j, f"{src.name if isinstance(src, ImageBytes) else _shown(Path(src), base)}: {e.reason}"])
                continue
            if image_choice == "first":
                break
        if ims:
            tensors.append(backbone.preprocess_images([im for _, im in ims]))
        pr.images.append([j for j, _ in ims])  # the decoded images are not kept
        del ims
        pr.rejects.append(sorted(rej))
    nonempty = [t for t in pr.texts if t]
    if nonempty:
        with tokenize_lock if tokenize_lock is not None else contextlib.nullcontext():
            pr.tokens = backbone.tokenize(nonempty)
    if tensors:
        import torch

        flat = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        del tensors
        step = backbone.batch_size
        pr.pixels = [flat[s:s + step].clone() for s in range(0, len(flat), step)]
    return pr


def encode_prepared(backbone, pr: PreparedBatch, image_choice: str = "similar") -> EncodedBatch:
    """The model forward of a prepared batch, then one image vector per post and the masks."""
    D = backbone.dim
    t_emb = backbone.forward_text(pr.tokens) if pr.tokens is not None else np.zeros((0, D), np.float32)
    i_emb = (np.concatenate([backbone.forward_images(x) for x in pr.pixels]) if pr.pixels
             else np.zeros((0, D), np.float32))
    n = len(pr)
    text, image = np.zeros((n, D), np.float32), np.zeros((n, D), np.float32)
    tmask, imask = np.zeros(n, bool), np.zeros(n, bool)
    used: list[list[int]] = []
    ti = ii = 0
    for r in range(n):
        if pr.texts[r]:
            text[r], tmask[r] = t_emb[ti], True
            ti += 1
        idx = pr.images[r]
        if idx:
            image[r], rows = choose_image(image_choice, i_emb[ii:ii + len(idx)], text[r] if tmask[r] else None)
            imask[r] = True
            ii += len(idx)
            used.append([idx[c] for c in rows])
        else:
            used.append([])
    return EncodedBatch(text, image, tmask, imask, list(pr.texts), used, pr.rejects)


def encode_posts(backbone, cleaner: TextCleaner, posts: Sequence[Post], image_choice: str = "similar", *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, base: Path | None = None,
                 on_error: str = "skip", max_images: int | None = DEFAULT_MAX_IMAGES,
                 reduce_to: int | None = 0) -> EncodedBatch:
    """Both stages for one batch of posts (what one batch of ``extract_features`` computes)."""
    pr = prepare_batch(backbone, cleaner, posts, image_choice, max_pixels=max_pixels, base=base,
                       on_error=on_error, max_images=max_images, reduce_to=reduce_to)
    return encode_prepared(backbone, pr, image_choice)

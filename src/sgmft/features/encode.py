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

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

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
           "encode_posts", "encode_prepared", "prepare_batch", "tokenize_long"]


def check_image_choice(image_choice: str) -> str:
    if image_choice not in IMAGE_CHOICES:
        raise InputError(f"image_choice must be one of {IMAGE_CHOICES}, got {image_choice!r}")
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
    text_rows: list[int] | None = None                     # token rows per non-empty text (chunk-mean); None: 1 each
    text_over: list[bool] = field(default_factory=list)    # per post: text longer than the encoder's context
    text_cut: list[bool] = field(default_factory=list)     # per post: some of its tokens not seen by the encoder

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
    text_over: np.ndarray | None = None  # (N,) bool: text longer than the encoder's context (long_text applied)
    text_cut: np.ndarray | None = None   # (N,) bool: some of the text's tokens not seen by the encoder


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
    pr.text_over, pr.text_cut = [False] * len(pr.texts), [False] * len(pr.texts)
    if nonempty:
        with tokenize_lock if tokenize_lock is not None else contextlib.nullcontext():
            pr.tokens, pr.text_rows, over, cut = tokenize_long(backbone, nonempty, cleaner.cfg.long_text)
        where = [r for r, t in enumerate(pr.texts) if t]
        for r, o, c in zip(where, over, cut):
            pr.text_over[r], pr.text_cut[r] = o, c
    if tensors:
        import torch

        flat = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        del tensors
        step = backbone.batch_size
        pr.pixels = [flat[s:s + step].clone() for s in range(0, len(flat), step)]
    return pr


def tokenize_long(backbone, texts: list[str], long_text: str = "truncate"):
    """Tokens for ``texts`` under the long-text policy ``long_text`` (:class:`CleanConfig`).

    Returns ``(tokens, rows, over, cut)``: ``rows`` is the number of token rows of each text
    (``None`` when every text has one), ``over[i]`` whether text ``i`` is longer than the
    encoder's context of ``B`` content tokens, ``cut[i]`` whether some of its tokens are not seen:

    * ``truncate``: ``backbone.tokenize`` (the first ``B`` tokens), unchanged;
    * ``head-tail[:H]``: the first ``H`` (default ``B // 2``) and the last ``B - H`` tokens;
    * ``chunk-mean[:K]``: consecutive windows of ``B`` tokens, at most ``K`` (default 8); their
      L2-normalised embeddings are averaged by :func:`encode_prepared`.

    A backbone without a token limit (no ``text_ids``, e.g. ``cnn-wordemb``) sees whole texts.
    """
    from sgmft.ingest.text import DEFAULT_MAX_CHUNKS, parse_long_text

    policy, arg = parse_long_text(long_text)
    if not hasattr(backbone, "text_ids"):
        if policy != "truncate":
            raise InputError(f"long_text {long_text!r}: backbone {backbone.spec!r} reads whole texts (no token "
                             "limit); use the default 'truncate'")
        return backbone.tokenize(texts), None, [False] * len(texts), [False] * len(texts)
    ids, budget = backbone.text_ids(texts), backbone.text_budget
    over = [len(x) > budget for x in ids]
    if policy == "truncate":
        return backbone.tokenize(texts), None, over, over
    if policy == "head-tail":
        h = min(budget, budget // 2 if arg is None else arg)
        wins = [x if len(x) <= budget else x[:h] + x[len(x) - (budget - h):] for x in ids]
        return backbone.tokens_from_ids(wins), None, over, over
    k = DEFAULT_MAX_CHUNKS if arg is None else arg
    wins, rows = [], []
    for x in ids:
        w = [x[i:i + budget] for i in range(0, len(x), budget)][:k] or [x]
        wins.extend(w)
        rows.append(len(w))
    return backbone.tokens_from_ids(wins), rows, over, [len(x) > k * budget for x in ids]


def _mean_rows(emb: np.ndarray, rows: list[int] | None) -> np.ndarray:
    """One L2-normalised vector per text: the mean of its rows' (normalised) embeddings."""
    if rows is None:
        return emb
    out, s = np.zeros((len(rows), emb.shape[1]), np.float32), 0
    for i, n in enumerate(rows):
        m = emb[s:s + n].astype(np.float64).mean(0)
        out[i] = m / max(np.linalg.norm(m), 1e-12)
        s += n
    return out


def encode_prepared(backbone, pr: PreparedBatch, image_choice: str = "similar") -> EncodedBatch:
    """The model forward of a prepared batch, then one image vector per post and the masks."""
    D = backbone.dim
    t_emb = (_mean_rows(backbone.forward_text(pr.tokens), pr.text_rows) if pr.tokens is not None
             else np.zeros((0, D), np.float32))
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
    return EncodedBatch(text, image, tmask, imask, list(pr.texts), used, pr.rejects,
                        np.asarray(pr.text_over or [False] * n, bool), np.asarray(pr.text_cut or [False] * n, bool))


def encode_posts(backbone, cleaner: TextCleaner, posts: Sequence[Post], image_choice: str = "similar", *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, base: Path | None = None,
                 on_error: str = "skip", max_images: int | None = DEFAULT_MAX_IMAGES,
                 reduce_to: int | None = 0) -> EncodedBatch:
    """Both stages for one batch of posts (what one batch of ``extract_features`` computes)."""
    pr = prepare_batch(backbone, cleaner, posts, image_choice, max_pixels=max_pixels, base=base,
                       on_error=on_error, max_images=max_images, reduce_to=reduce_to)
    return encode_prepared(backbone, pr, image_choice)

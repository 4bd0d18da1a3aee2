"""Predict the semantic place of *raw* posts (text + image files) with a trained run.

:class:`PostPredictor` = a :class:`~sgmft.predict.features.Predictor` (the trained model) + the
frozen backbone the training features came from + the text-cleaning settings and image
choice used at extraction. Every post goes through the code ``sgmft extract`` runs,
:mod:`sgmft.features.encode`: clean the text, load each image robustly (a bad file is
reported and skipped), encode with the backbone, pick one image vector and set
``text_mask`` / ``image_mask`` False for a missing modality. So a post predicted here gets
the probabilities it would get by extracting it into a store and predicting the store.

Where the settings come from (``PostPredictor.load(run_dir)``):

* everything comes from the feature contract in the checkpoint's ``features.json``
  (:mod:`sgmft.checkpoint`): the backbone spec (override with ``backbone=``; the override
  must have the same D and, when recorded, the same backbone fingerprint, i.e. the same
  weights, tokenizer and preprocessing), its precision, the cleaning settings and the
  image choice. The training store is not needed;
* features not made by ``sgmft extract`` (``"extraction": null``): the defaults (every
  cleaning step on, ``"similar"``) and a note;
* checkpoints older than the contract: migrated when read (:func:`sgmft.checkpoint.migrate`)
  from the training store named in the run's ``run.json``; if that store is gone, the
  defaults and a note that says so.

Reading and checking the contract is :class:`sgmft.checkpoint.FeatureContract`'s; this
module loads the backbone it names and encodes posts. See docs/predict.md.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import heapq
import itertools
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from sgmft.atomic import check_outputs
from sgmft.checkpoint import FeatureContract
from sgmft.checkpoint import clean_config_from as _clean_cfg_from  # noqa: F401  (older imports)
from sgmft.features.encode import DEFAULT_MAX_IMAGES, check_image_choice, encode_posts
from sgmft.ingest.images import DEFAULT_MAX_PIXELS, ImageBytes
from sgmft.ingest.manifest import Post, Reject, iter_manifest, write_rejects
from sgmft.ingest.text import CleanConfig, TextCleaner
from sgmft.predict.features import (BackboneMismatchError, PrecisionMismatchError, Predictions,  # noqa: F401
                                    Predictor, check_min_confidence, uncertain_mask)
from sgmft.predict.output import PredictionBatch, write_prediction_batches

__all__ = ["BackboneMismatchError", "BatchEncoder", "PostPredictor", "post_result"]


def post_result(label_names: Sequence[str], probs, *, uncertain: bool = False, explanation: dict | None = None,
                **more) -> dict:
    """The one per-post result dict (:meth:`PostPredictor.predict_post`, and every answer of the
    HTTP service, :mod:`sgmft.serve.app`): ``label`` (the most probable place), ``prob`` (its
    probability), ``probs`` (every place's), ``uncertain``, ``explanation``, then ``more``."""
    probs = np.asarray(probs)
    top = int(probs.argmax())
    return {"label": label_names[top], "prob": float(probs[top]),
            "probs": {n: float(p) for n, p in zip(label_names, probs)},
            "uncertain": bool(uncertain), "explanation": explanation, **more}


# -- loading: the backbone a contract names ----------------------------------------------------
def _load_recorded(spec: str, trained_spec: str, given: bool, model_dir: Path, *, device: str, dtype: str,
                   batch_size: int):
    """``load_backbone``, with a short error that starts with the fix when the recorded
    backbone (``given`` False) is not available here or no registered backbone makes it."""
    from sgmft.features.backbones import BackboneUnavailableError, load_backbone

    try:
        return load_backbone(spec, device=device, dtype=dtype, batch_size=batch_size)
    except KeyError as e:                    # no registered backbone makes these features
        if given:
            raise
        raise InputError(
            f"the model {model_dir} was trained on features from {trained_spec!r}, which no registered backbone "
            "computes (SimFeat, or features you made yourself), so it cannot encode raw posts. Predict feature "
            "vectors instead: `sgmft predict RUN --store STORE --out preds.csv` (Predictor.predict_store in "
            "Python), or pass --backbone SPEC if those features did come from a backbone "
            f"({e.args[0] if e.args else e})"
        ) from None
    except BackboneUnavailableError as e:
        if given:
            raise
        # the recorded backbone moved or is not on this machine: the fix comes first, short
        cause = (str(e).splitlines() or [""])[0]
        raise BackboneUnavailableError(
            f"pass --backbone SPEC (backbone= in Python): the backbone the model was trained with, "
            f"{trained_spec!r}, is not available here.\n  {cause}\n  If its weights moved, give their "
            "new location; to get them, see docs/backbones.md.") from None


def _backbone_for(contract: FeatureContract, backbone, model_dir: Path, *, device: str, batch_size: int,
                  precision: str | None, allow_precision_mismatch: bool) -> tuple[Any, list[str]]:
    """``(backbone, notes)``: ``backbone`` (a loaded one, or a spec) or the one the contract
    records, at ``precision`` (default: the recorded one); another precision than the recorded
    one is refused before any weights load (:meth:`FeatureContract.check_precision`)."""
    from sgmft.features.backbones import Backbone
    from sgmft.features.backbones.base import canonical_precision

    kw = dict(where=f"the model {model_dir}", allow_precision_mismatch=allow_precision_mismatch)
    if isinstance(backbone, Backbone):
        return backbone, contract.check_precision(backbone.precision, **kw)
    spec = contract.raw_backbone_spec(model_dir) if backbone is None else backbone if isinstance(backbone, str) else None
    want = canonical_precision(precision) if precision else None
    notes = contract.check_precision(want, **kw) if want not in (None, "auto") else []
    bb = _load_recorded(spec, contract.backbone, backbone is not None, model_dir, device=device,
                        dtype=want or contract.precision or "auto", batch_size=batch_size)
    if want == "auto":
        notes += contract.check_precision(bb.precision, **kw)
    return bb, notes


class PostPredictor:
    """Raw posts in, place probabilities out. Build with :meth:`load`."""

    def __init__(self, predictor: Predictor, backbone, clean_cfg: CleanConfig | None = None,
                 image_choice: str = "similar", *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 batch_size: int = 32, notes: Sequence[str] = (), max_images: int | None = DEFAULT_MAX_IMAGES):
        check_image_choice(image_choice)
        if backbone.dim != predictor.dim:
            raise BackboneMismatchError(
                f"backbone {backbone.spec!r} gives D={backbone.dim} features, the model expects "
                f"D={predictor.dim} (it was trained on {predictor.features.get('backbone')!r})")
        self.predictor, self.backbone = predictor, backbone
        self.cleaner = TextCleaner(clean_cfg)
        self.image_choice, self.max_pixels, self.batch_size = image_choice, max_pixels, int(batch_size)
        self.max_images = max_images  # images used per post; the rest are reported as rejects
        self.notes = list(notes)   # load-time caveats (settings that could not be verified)

    @property
    def label_names(self) -> list[str]:
        return self.predictor.label_names

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir, backbone=None, *, device: str = "auto", batch_size: int = 32,
             clean_cfg: CleanConfig | None = None, image_choice: str | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS, check_backbone: bool = True,
             max_images: int | None = DEFAULT_MAX_IMAGES, precision: str | None = None,
             allow_precision_mismatch: bool = False) -> "PostPredictor":
        """Load a run (or its ``model/`` directory) and the backbone its features came from.

        ``backbone``: a spec (``"chinese-clip:/models/cc-vit-h"``) or a loaded ``Backbone``;
        default: the spec recorded in the checkpoint. Raises ``FileNotFoundError`` for a
        missing run, :class:`BackboneMismatchError` for a backbone that differs from the
        training one (``check_backbone=False`` turns a fingerprint difference into a note)
        and ``BackboneUnavailableError`` when the weights are not available offline.
        ``precision`` (fp32/bf16/int8, default: the precision the training features were
        extracted at, recorded in the contract): another precision than the recorded one raises
        :class:`PrecisionMismatchError` unless ``allow_precision_mismatch`` (then a note, and
        the weights are still checked against the fingerprint at the recorded precision).
        """
        from sgmft.features.backbones.base import resolve_device

        rd = Path(run_dir)
        if not rd.exists():
            raise FileNotFoundError(f"run directory not found: {rd}")
        dev = resolve_device(device)
        pred = Predictor.load(rd, device=str(dev))
        model_dir = Path(pred.info.get("path", rd))
        contract = pred.contract                  # read, checked and migrated by sgmft.checkpoint
        notes = contract.unknown_notes(model_dir)
        if clean_cfg is None:
            clean_cfg = contract.clean_config()
        image_choice = contract.image_choice if image_choice is None else image_choice
        bb, more = _backbone_for(contract, backbone, model_dir, device=str(dev), batch_size=batch_size,
                                 precision=precision, allow_precision_mismatch=allow_precision_mismatch)
        notes += more
        # the one check of a backbone against the contract: D, precision, fingerprint at the trained precision
        notes += [n for n in contract.check_backbone(bb, where=f"the model {model_dir}", check_fingerprint=check_backbone,
                                                     allow_precision_mismatch=allow_precision_mismatch)
                  if n not in notes]
        notes += contract.check_cleaner(clean_cfg)
        return cls(pred, bb, clean_cfg, image_choice, max_pixels=max_pixels, batch_size=batch_size, notes=notes,
                   max_images=max_images)

    @classmethod
    def from_pretrained(cls, name_or_path, backbone=None, *, revision: str | None = None, cache_dir=None,
                        **kw) -> "PostPredictor":
        """:meth:`load` on a folder or a Hugging Face hub id (see
        :meth:`sgmft.predict.Predictor.from_pretrained`); the backbone is loaded as in :meth:`load`."""
        from sgmft.predict.pretrained import resolve_pretrained

        return cls.load(resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir), backbone, **kw)

    def save_pretrained(self, out_dir, **kw) -> Path:
        """The model folder and its card (:meth:`Predictor.save_pretrained`); the backbone's
        weights are not copied, the feature contract names them."""
        return self.predictor.save_pretrained(out_dir, **kw)

    # -- single posts ------------------------------------------------------------------------
    def predict_post(self, text: str | None, images: Sequence[str | os.PathLike | ImageBytes] = (), *,
                     min_confidence: float | None = None) -> dict:
        """One post -> ``{label, prob, probs, text_used, image_used, image_index, text_mask, image_mask,
        warnings, image_rejects, uncertain, explanation}``.

        ``label`` is the most probable place, ``probs`` maps every place to its probability,
        ``text_used`` is the cleaned text the model saw (``""`` = none), ``image_used`` the
        image the image vector came from (a list of paths with ``image_choice="mean"``;
        ``None`` = none) and ``image_index`` its position in ``images``. Unusable images and
        missing modalities are reported in ``warnings`` (and the unusable images as
        ``image_rejects``: ``[index, reason]`` pairs); nothing raises for bad input files.
        ``prob`` and ``probs`` are calibrated (the checkpoint's temperature). ``uncertain`` is
        True when ``prob`` is below ``min_confidence`` (never without one; the probabilities
        are kept). ``explanation`` says which modality decided (:mod:`sgmft.predict.explain`):
        ``{decided_by, text, image, sentence, method, scores}``.
        """
        if isinstance(images, (str, os.PathLike, ImageBytes)):
            images = [images]
        return self.predict_posts([(text, images)], min_confidence=min_confidence)[0]

    def predict_posts(self, posts: Sequence[tuple[str | None, Sequence[str | os.PathLike | ImageBytes]]], *,
                      min_confidence: float | None = None) -> list[dict]:
        """Many ``(text, images)`` posts, encoded in batches of ``batch_size``; one
        :meth:`predict_post` result per post. Images may be paths or
        :class:`~sgmft.ingest.images.ImageBytes` (bytes in memory: what the HTTP service
        passes, which never passes paths)."""
        check_min_confidence(min_confidence)
        items = []
        for text, images in posts:
            if text is not None and not isinstance(text, str):
                raise TypeError(f"text must be a str, got {type(text).__name__}")
            imgs = tuple(im if isinstance(im, ImageBytes) else Path(im) for im in images)
            items.append(Post("post", "", text or "", imgs, None, None, 0))
        out: list[dict] = []
        for s in range(0, len(items), self.batch_size):
            batch = items[s:s + self.batch_size]
            enc = encode_posts(self.backbone, self.cleaner, batch, self.image_choice, max_pixels=self.max_pixels,
                               max_images=self.max_images)
            p = self.predictor.predict_features(enc.text, enc.image, enc.text_mask, enc.image_mask,
                                                min_confidence=min_confidence, explain=True)
            out.extend(self._result(post, enc, r, p.probs[r], bool(p.uncertain[r]), p.explanations[r])
                       for r, post in enumerate(batch))
        return out

    def _result(self, post: Post, enc, r: int, probs, uncertain: bool = False, explanation: dict | None = None) -> dict:
        given = [str(p) for p in post.images]
        rejects = [[j, reason.removeprefix(f"{given[j]}: ")] for j, reason in enc.rejects[r]]
        warnings = [f"image {given[j]} not used: {reason}" for j, reason in rejects]
        tm, im = bool(enc.text_mask[r]), bool(enc.image_mask[r])
        if not tm and not im:
            warnings.append("no usable text or image: the prediction is the model's answer for an empty post")
        elif not tm:
            warnings.append("no text left after cleaning: predicted from the image only")
        elif not im:
            warnings.append("no usable image: predicted from the text only")
        idx = enc.images_used[r]
        several = self.image_choice == "mean" and len(idx) > 1
        image_used: Any = ([given[j] for j in idx] if several else given[idx[0]]) if idx else None
        image_index: Any = (list(idx) if several else idx[0]) if idx else None
        return post_result(self.label_names, probs, uncertain=uncertain, explanation=explanation,
                           text_used=enc.texts_used[r], image_used=image_used, image_index=image_index,
                           text_mask=tm, image_mask=im, warnings=warnings, image_rejects=rejects)

    # -- manifests ---------------------------------------------------------------------------
    def encode_batches(self, batches: Iterable[list[Post]],
                       base: Path) -> Iterator[tuple[list[Post], Any, Predictions]]:
        """The default ``encoder`` of :meth:`predict_manifest`, in this process: for each batch of
        posts, in order, ``(posts, encoded, predictions)``: the :class:`~sgmft.features.encode.EncodedBatch`
        (its ``text_mask``, ``image_mask`` and per-post image ``rejects`` are read) and the
        :class:`~sgmft.predict.features.Predictions` with explanations."""
        for batch in batches:
            enc = encode_posts(self.backbone, self.cleaner, batch, self.image_choice, max_pixels=self.max_pixels,
                               base=base, max_images=self.max_images)
            yield batch, enc, self.predictor.predict_features(enc.text, enc.image, enc.text_mask, enc.image_mask,
                                                              explain=True)

    def predict_manifest(self, manifest, out_path, rejects_path=None, *, progress: bool = False,
                         image_root=None, allow_any_path: bool = False, field_limits: dict | None = None,
                         min_confidence: float | None = None, encoder: BatchEncoder | None = None) -> dict:
        """Predict every valid post of a manifest; write one row per post to ``out_path``.

        The rows follow the one prediction schema (:mod:`sgmft.predict.output`): ``id, pred,
        prob_<place>..., true`` (``true`` when the manifest has labels), then ``text_mask,
        image_mask``, then ``uncertain`` (top probability below ``min_confidence``) and the
        explanation; CSV when ``out_path`` ends in ``.csv``, else JSONL. Bad
        rows (same checks as ``sgmft extract``; labels must be places the model knows) and
        unusable images are written to ``rejects_path`` (default ``<out>.rejects.jsonl``)
        and counted, never raised. Returns a summary dict. Image paths are confined as in
        ``sgmft extract`` (``image_root``, ``allow_any_path``; docs/posts-manifest.md), and an
        output naming the manifest is refused before anything is written.

        The manifest is streamed (:func:`~sgmft.ingest.manifest.iter_manifest`, one chunk per
        batch of ``batch_size`` posts) and the rows are written as the batches come back, so
        memory holds a few batches, the rejects and the duplicate-id hashes (about 24 bytes a
        post), whatever the manifest's length; the output appears atomically at the end.

        ``encoder``: who encodes and predicts the batches (:class:`BatchEncoder`, default
        :meth:`encode_batches`, in this process). It is called once with the iterator of
        batches (lists of :class:`~sgmft.ingest.manifest.Post`) and the folder image paths are
        relative to, and yields ``(posts, encoded, predictions)`` per batch in the same order.
        The same on Ray Data: :func:`sgmft.predict.ray_predict.predict_manifest_ray`, which passes
        :class:`sgmft.predict.ray_predict.RayBatchEncoder`.
        """
        t0 = time.perf_counter()
        check_min_confidence(min_confidence)
        manifest, out_path = Path(manifest), Path(out_path)
        rejects_path = _rejects_path(manifest, out_path, rejects_path)
        chunks = iter_manifest(manifest, chunk_size=self.batch_size, label_names=self.label_names,
                               check_images=True, on_error="skip", image_root=image_root,
                               allow_any_path=allow_any_path, **(field_limits or {}))
        first = next(chunks, None)          # a missing manifest or image root raises here, before any output
        row_rejects: list[Reject] = []
        img_rejects: list[Reject] = []
        missing: Counter = Counter()

        def batches() -> Iterator[list[Post]]:
            for chunk in itertools.chain([first] if first is not None else [], chunks):
                row_rejects.extend(chunk.rejects)
                if chunk.posts:
                    yield chunk.posts

        def rows():
            for batch, enc, pb in (encoder or self.encode_batches)(batches(), manifest.resolve().parent):
                n = len(batch)
                img_rejects.extend(Reject(p.line, p.id, "images", reason, stage="extract")
                                   for r, p in enumerate(batch) for _, reason in enc.rejects[r])
                masks = {"text_mask": [bool(m) for m in enc.text_mask[:n]],
                         "image_mask": [bool(m) for m in enc.image_mask[:n]]}
                missing.update(text=n - sum(masks["text_mask"]), image=n - sum(masks["image_mask"]))
                yield PredictionBatch([p.id for p in batch], pb.probs, uncertain_mask(pb.probs, min_confidence),
                                      pb.explanations, [p.label for p in batch], masks)

        # with_true=None: a "true" column when some post has a label (known only at the end)
        tally = write_prediction_batches(out_path, self.label_names, rows(), total=None, with_true=None,
                                         extras=("text_mask", "image_mask"), progress=progress,
                                         min_confidence=min_confidence, t0=t0)
        # both lists are in line order; a stable merge keeps a row's problems before its images'
        write_rejects(rejects_path, heapq.merge(row_rejects, img_rejects, key=lambda r: r.line))
        n_rejects = len(row_rejects) + len(img_rejects)
        return tally.summary(rejects_path=str(rejects_path), rejects=n_rejects,
                             rows_rejected=len({r.line for r in row_rejects}), images_rejected=len(img_rejects),
                             text_missing=missing["text"], image_missing=missing["image"])


class BatchEncoder(Protocol):
    """The ``encoder=`` of :meth:`PostPredictor.predict_manifest`: called once with the batches
    of valid posts (an iterator, consumed lazily or all at once) and the manifest's folder;
    yields, per batch and in the same order, ``(posts, encoded, predictions)``: the batch's
    posts, an object with ``text_mask``, ``image_mask`` (n bools) and ``rejects`` (per post, a
    list of ``(image index, reason)``), and :class:`~sgmft.predict.features.Predictions` with
    ``probs`` and ``explanations``. Implementations: :meth:`PostPredictor.encode_batches`
    (in process) and :class:`sgmft.predict.ray_predict.RayBatchEncoder` (Ray Data)."""

    def __call__(self, batches: Iterator[list[Post]], base: Path) -> Iterator[tuple[list[Post], Any, Predictions]]:
        ...


def _rejects_path(manifest: Path, out_path: Path, rejects_path) -> Path:
    """The rejects file (default ``<out>.rejects.jsonl``); refused when it is the output, or when
    an output names the manifest (before anything is written)."""
    rejects_path = Path(rejects_path) if rejects_path is not None else out_path.with_name(
        out_path.name.rsplit(".", 1)[0] + ".rejects.jsonl")
    if rejects_path.resolve() == out_path.resolve():
        raise InputError(f"the rejects file must differ from the output file ({out_path})")
    check_outputs({"the manifest": manifest},
                  {"the output (--out)": out_path, "the rejects file (--rejects)": rejects_path})
    return rejects_path

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
* checkpoints older than the contract: ``extra.clean_config`` / ``extra.image_choice`` of
  the training store named in the run's ``run.json``; if that store is gone, the defaults
  and a note that says so.

See docs/predict.md.
"""

from __future__ import annotations

from sgmft.errors import InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from sgmft.atomic import atomic_file, check_outputs
from sgmft.features.encode import DEFAULT_MAX_IMAGES, IMAGE_CHOICES, check_image_choice, encode_posts
from sgmft.ingest.images import DEFAULT_MAX_PIXELS, ImageBytes
from sgmft.ingest.manifest import Post, Reject, read_manifest, write_rejects
from sgmft.ingest.text import CleanConfig, TextCleaner
from sgmft.predict.features import (BackboneMismatchError, PrecisionMismatchError, Predictions,  # noqa: F401
                                    Predictor, check_min_confidence, uncertain_mask)
from sgmft.predict.output import PredictionWriter, prediction_format
from sgmft.runs import RunDir

__all__ = ["BackboneMismatchError", "PostPredictor", "training_extract_info"]




# -- what the training features were made with -------------------------------------------------
def training_extract_info(model_dir: Path) -> tuple[dict | None, str | None]:
    """``(store meta or None, store path or None)`` of the store the run was trained on.

    Only for checkpoints written before ``features.json`` carried the feature contract."""
    for run_json in (model_dir / "run.json", RunDir(model_dir.parent).run_json):
        if run_json.is_file():
            try:
                store = json.loads(run_json.read_text(encoding="utf-8")).get("store")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return None, None
            if not store:
                return None, None
            meta_path = Path(store) / "meta.json"
            try:
                return json.loads(meta_path.read_text(encoding="utf-8")), str(store)
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                return None, str(store)
    return None, None


def _clean_cfg_from(d: dict) -> CleanConfig:
    names = {f.name for f in dataclasses.fields(CleanConfig)}
    return CleanConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


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
        from sgmft.features.backbones import BACKBONES, Backbone, BackboneUnavailableError, load_backbone
        from sgmft.features.backbones.base import resolve_device

        rd = Path(run_dir)
        if not rd.exists():
            raise FileNotFoundError(f"run directory not found: {rd}")
        dev = resolve_device(device)
        pred = Predictor.load(rd, device=str(dev))
        model_dir = Path(pred.info.get("path", rd))
        notes: list[str] = []
        trained_spec = pred.features.get("backbone")
        if "extraction" in pred.features:
            # the feature contract saved in the checkpoint (sgmft.checkpoint)
            extra = pred.features["extraction"] or {}
            if not extra:
                notes.append(f"the model {model_dir} was trained on features not made by `sgmft extract` "
                             "(no cleaning settings recorded): using the default text cleaning and image "
                             "choice 'similar'")
        else:
            # an older checkpoint: the contract is in its training store's metadata, if still there
            meta, store_path = training_extract_info(model_dir)
            extra = (meta or {}).get("extra", {}) if isinstance(meta, dict) else {}
            if meta is None:
                notes.append(f"checkpoint {model_dir} predates the feature contract in features.json and its "
                             f"training store {store_path or '(not recorded)'} is not readable: using the "
                             "default text cleaning and image choice 'similar'; the backbone weights are not "
                             "verified (retrain, or keep the store, to record them)")
            elif "clean_config" not in extra:
                notes.append(f"training store {store_path} was not made by `sgmft extract` (no cleaning "
                             "settings recorded): using the default text cleaning and image choice 'similar'")

        # text cleaning + image choice of the training features
        if clean_cfg is None and isinstance(extra.get("clean_config"), dict):
            clean_cfg = _clean_cfg_from(extra["clean_config"])
            if clean_cfg.user_dict and not Path(clean_cfg.user_dict).is_file():
                raise FileNotFoundError(
                    f"the training features were cleaned with the jieba user dictionary {clean_cfg.user_dict}, "
                    "which is missing here; restore it or pass clean_cfg= explicitly")
        if image_choice is None:
            image_choice = extra.get("image_choice") if extra.get("image_choice") in IMAGE_CHOICES else "similar"

        # the backbone
        if backbone is None:
            if not trained_spec or trained_spec == "unknown":
                raise InputError(f"{model_dir}: the checkpoint does not record the backbone its features "
                                 "came from; pass backbone= (--backbone SPEC)")
            spec = trained_spec
            if spec.partition(":")[0] not in BACKBONES:
                raise InputError(
                    f"{model_dir}: the model was trained on features from {trained_spec!r}, which is not a "
                    "raw-post backbone (a SimFeat store or features you computed yourself), so it cannot "
                    "encode a raw post: it predicts only from features. Predict on a feature store with "
                    "`sgmft predict RUN --store STORE --out preds.csv` (Predictor.predict_store in Python), "
                    "or pass --backbone SPEC if the features did come from a registered backbone "
                    f"({', '.join(BACKBONES.names())})")
        else:
            spec = backbone if isinstance(backbone, str) else None
        from sgmft.features.backbones.base import canonical_precision

        trained_prec = extra.get("backbone_precision")
        want_prec = canonical_precision(precision) if precision else None

        def _check_precision(got: str) -> None:
            if not trained_prec or got == trained_prec:
                return
            msg = (f"the model {model_dir} was trained on features extracted at precision {trained_prec}, but the "
                   f"backbone would run at {got}: features differ slightly between precisions")
            if not allow_precision_mismatch:
                raise PrecisionMismatchError(
                    f"{msg}. Use the training precision (the default; --precision {trained_prec}), or accept the "
                    "difference with --allow-precision-mismatch (allow_precision_mismatch=True)")
            notes.append(msg + " (allowed by --allow-precision-mismatch)")

        if isinstance(backbone, Backbone):
            bb = backbone
            _check_precision(bb.precision)
        else:
            if want_prec is not None and want_prec != "auto":
                _check_precision(want_prec)
            try:
                bb = load_backbone(spec, device=str(dev), dtype=want_prec or trained_prec or "auto",
                                   batch_size=batch_size)
            except KeyError as e:                    # no registered backbone makes these features
                if backbone is not None:
                    raise
                raise InputError(
                    f"the model {model_dir} was trained on features from {trained_spec!r}, which no "
                    "registered backbone computes (SimFeat, or features you made yourself), so it cannot "
                    "encode raw posts. Predict feature vectors instead: `sgmft predict RUN --store STORE "
                    "--out preds.csv` (Predictor.predict_store in Python), or pass --backbone SPEC if "
                    f"those features did come from a backbone ({e.args[0] if e.args else e})") from None
            except BackboneUnavailableError as e:
                if backbone is not None:
                    raise
                # the recorded backbone moved or is not on this machine: the fix comes first, short
                cause = (str(e).splitlines() or [""])[0]
                raise BackboneUnavailableError(
                    f"pass --backbone SPEC (backbone= in Python): the backbone the model was trained with, "
                    f"{trained_spec!r}, is not available here.\n  {cause}\n  If its weights moved, give their "
                    "new location; to get them, see docs/backbones.md.") from None
            if want_prec == "auto":
                _check_precision(bb.precision)
        # the one check of a backbone against the feature contract (sgmft.checkpoint): D, precision,
        # fingerprint at the trained precision
        from sgmft.checkpoint import FeatureContract

        contract = dataclasses.replace(FeatureContract.from_dict(pred.features), dim=pred.dim)
        notes += [n for n in contract.check_backbone(bb, where=f"the model {model_dir}",
                                                     check_fingerprint=check_backbone,
                                                     allow_precision_mismatch=allow_precision_mismatch)
                  if n not in notes]
        if clean_cfg is not None and extra.get("clean_fingerprint"):
            fp = TextCleaner(clean_cfg).fingerprint()
            if fp != extra["clean_fingerprint"]:
                notes.append("text cleaning differs from training (settings, jieba version or stop-word "
                             "lists changed): cleaned texts may not match the training features")
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
        top = int(probs.argmax())
        return {"label": self.label_names[top], "prob": float(probs[top]),
                "probs": {n: float(p) for n, p in zip(self.label_names, probs)},
                "text_used": enc.texts_used[r], "image_used": image_used, "image_index": image_index,
                "text_mask": tm, "image_mask": im, "warnings": warnings, "image_rejects": rejects,
                "uncertain": bool(uncertain), "explanation": explanation}

    # -- manifests ---------------------------------------------------------------------------
    def _encode_batches(self, batches, base):
        """``(EncodedBatch, Predictions with explanations)`` of each batch of posts, in order, in this process."""
        for batch in batches:
            enc = encode_posts(self.backbone, self.cleaner, batch, self.image_choice, max_pixels=self.max_pixels,
                               base=base, max_images=self.max_images)
            yield enc, self.predictor.predict_features(enc.text, enc.image, enc.text_mask, enc.image_mask,
                                                       explain=True)

    def predict_manifest(self, manifest, out_path, rejects_path=None, *, progress: bool = False,
                         image_root=None, allow_any_path: bool = False, field_limits: dict | None = None,
                         min_confidence: float | None = None, _encoded=None) -> dict:
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
        The same on Ray Data: :func:`sgmft.predict.ray_predict.predict_manifest_ray`.
        """
        t0 = time.perf_counter()
        check_min_confidence(min_confidence)
        manifest, out_path = Path(manifest), Path(out_path)
        rejects_path = Path(rejects_path) if rejects_path is not None else out_path.with_name(
            out_path.name.rsplit(".", 1)[0] + ".rejects.jsonl")
        if rejects_path.resolve() == out_path.resolve():
            raise InputError(f"the rejects file must differ from the output file ({out_path})")
        check_outputs({"the manifest": manifest},
                      {"the output (--out)": out_path, "the rejects file (--rejects)": rejects_path})
        posts, row_rejects = read_manifest(manifest, label_names=self.label_names, check_images=True,
                                           on_error="skip", image_root=image_root,
                                           allow_any_path=allow_any_path, **(field_limits or {}))
        base = manifest.resolve().parent
        with_true = any(p.label is not None for p in posts)
        names = self.label_names
        out_path.parent.mkdir(parents=True, exist_ok=True)
        img_rejects: list[Reject] = []
        counts: Counter = Counter()
        n_text_missing = n_image_missing = n_labelled = n_correct = n_uncertain = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(posts), unit="post", desc="predict", disable=not progress, dynamic_ncols=True)
        try:
            with atomic_file(out_path, "w", encoding="utf-8", newline="") as f:
                writer = PredictionWriter(f, prediction_format(out_path), names, with_true=with_true,
                                          extras=("text_mask", "image_mask"), with_uncertain=True,
                                          with_explanation=True)
                batches = [posts[s:s + self.batch_size] for s in range(0, len(posts), self.batch_size)]
                # per batch, in order: (its masks and image rejects, its probabilities)
                encoded = (_encoded or self._encode_batches)(batches, base)
                for batch, (enc, pb) in zip(batches, encoded):
                    probs, unc = pb.probs, uncertain_mask(pb.probs, min_confidence)
                    n_uncertain += int(unc.sum())
                    for r, p in enumerate(batch):
                        img_rejects.extend(Reject(p.line, p.id, "images", reason, stage="extract")
                                           for _, reason in enc.rejects[r])
                        top = int(probs[r].argmax())
                        counts[names[top]] += 1
                        n_text_missing += not bool(enc.text_mask[r])
                        n_image_missing += not bool(enc.image_mask[r])
                        if p.label is not None:
                            n_labelled += 1
                            n_correct += p.label == names[top]
                    writer.write([p.id for p in batch], probs,
                                 [p.label for p in batch] if with_true else None,
                                 {"text_mask": [bool(m) for m in enc.text_mask[:len(batch)]],
                                  "image_mask": [bool(m) for m in enc.image_mask[:len(batch)]]},
                                 uncertain=unc, explanations=pb.explanations)
                    bar.update(len(batch))
        finally:
            bar.close()
        rejects = sorted(list(row_rejects) + img_rejects, key=lambda r: r.line)
        write_rejects(rejects_path, rejects)
        summary = {"posts": len(posts), "out": str(out_path), "rejects_path": str(rejects_path),
                   "rejects": len(rejects), "rows_rejected": len({r.line for r in row_rejects}),
                   "images_rejected": len(img_rejects), "text_missing": n_text_missing,
                   "image_missing": n_image_missing, "predicted": {n: counts[n] for n in names if counts[n]},
                   "labelled": n_labelled, "seconds": round(time.perf_counter() - t0, 2)}
        if min_confidence is not None:
            summary.update(min_confidence=float(min_confidence), uncertain=n_uncertain)
        if n_labelled:
            summary["accuracy"] = n_correct / n_labelled
        return summary

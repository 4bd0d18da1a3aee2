"""Exported model checkpoints: a folder that loads safely and predicts identically.

Layout (``<run>/model/``, see :mod:`sgmft.runs` for the rest of the run folder):
  config.json       model config, train config, preset name
  labels.json       label names in index order
  features.json     the feature contract: what the model's inputs must be (below)
  model.safetensors the weights (safetensors: no pickle, safe for untrusted files)

``features.json`` holds ``backbone`` (the spec), ``dim`` and ``normalization`` and, under
``extraction``, how raw posts were turned into the training features, copied from the
training store's metadata when training: ``backbone_fingerprint`` (weights, tokenizer,
preprocessing, precision), ``backbone_precision``, ``clean_config`` + ``clean_fingerprint``
(text cleaning) and ``image_choice``. So a model folder alone is enough to predict raw posts
(like open_clip's ``preprocess_cfg`` beside its ``model_cfg``). ``extraction`` is ``null``
for features that ``sgmft extract`` did not make (SimFeat, the user's own); checkpoints
written before the contract existed have no ``extraction`` key at all.

:class:`FeatureContract` is the one owner of ``features.json``: written and read here
(:func:`write_model_folder`, :func:`read_checkpoint`), checked against a backbone by
:meth:`FeatureContract.check_backbone`; the model card (:mod:`sgmft.card`), the predictors
and the service read it through :func:`read_checkpoint` / :func:`load_checkpoint`.
``config.json`` records the schema ``version`` (:data:`SCHEMA_VERSION`); an older folder
is read through :data:`MIGRATIONS`, a newer one is refused.

Reading needs neither Lightning nor the training code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

from sgmft.atomic import atomic_dir
from sgmft.config import ModelConfig, TrainConfig, model_config_from_dict
from sgmft.errors import BackboneMismatchError, InputError, PrecisionMismatchError
from sgmft.models import build_model
from sgmft.models.output import calibrated_probs  # noqa: F401  (its home is the models' output contract)
from sgmft.models.registry import model_view
from sgmft.runs import RunDir, locate

FILES = ("config.json", "labels.json", "features.json", "model.safetensors")
# the store-metadata keys (meta["extra"], written by sgmft extract) that make up the contract
EXTRACTION_KEYS = ("backbone_fingerprint", "backbone_precision", "clean_config", "clean_fingerprint",
                   "image_choice")
# The checkpoint schema version, written as "version" in config.json. A reader takes every
# version up to this one (older ones through MIGRATIONS) and refuses newer ones.
#   1: the first format; features.json may lack "extraction" (written before the contract existed)
#   2: "extraction" is always written (null: features not made by `sgmft extract`); a version-1
#      folder without it is migrated from its training store's metadata when that is readable
SCHEMA_VERSION = 2


class CheckpointError(InputError):
    """A checkpoint folder that cannot be used; the message names the file."""


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")


@dataclass
class FeatureContract:
    """What a model's inputs must be (``features.json``): the one owner of that contract.

    ``extraction`` is the dict of :data:`EXTRACTION_KEYS` copied from the store that
    ``sgmft extract`` wrote, ``None`` for features it did not make (SimFeat, the user's own);
    ``extraction_known`` is False only for an old checkpoint whose training store could not
    be read (nothing is known). Keys this class does not know (added by newer writers of the
    same schema version) are kept in ``other`` and written back unchanged.
    """

    backbone: str | None = None
    dim: int | None = None
    normalization: str | None = None
    extraction: dict | None = None
    extraction_known: bool = True
    other: dict = field(default_factory=dict)

    KEYS = ("backbone", "dim", "normalization", "extraction")

    @classmethod
    def from_store_meta(cls, store_meta: dict) -> "FeatureContract":
        """The contract of a model trained on a store with metadata ``store_meta``."""
        extra = store_meta.get("extra") or {}
        extraction = ({k: extra.get(k) for k in EXTRACTION_KEYS if k in extra}
                      if "clean_config" in extra else None)
        return cls(store_meta.get("backbone"), store_meta.get("dim"), store_meta.get("normalization"), extraction)

    @classmethod
    def from_dict(cls, d, where: str | Path = "features.json") -> "FeatureContract":
        """Read ``features.json`` (already parsed); a wrong type is a :class:`CheckpointError`."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: must be a JSON object")
        dim = d.get("dim")
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
            raise CheckpointError(f"{where}: 'dim' must be a positive integer, got {dim!r}")
        ext = d.get("extraction")
        if ext is not None and not isinstance(ext, dict):
            raise CheckpointError(f"{where}: 'extraction' must be an object or null, got {type(ext).__name__}")
        for key in ("backbone", "normalization"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise CheckpointError(f"{where}: {key!r} must be a string, got {d[key]!r}")
        return cls(d.get("backbone"), dim, d.get("normalization"), ext, "extraction" in d,
                   {k: v for k, v in d.items() if k not in cls.KEYS})

    def to_dict(self) -> dict:
        """``features.json`` as a dict; ``extraction`` is absent only when it is not known."""
        d = {"backbone": self.backbone, "dim": self.dim, "normalization": self.normalization, **self.other}
        if self.extraction_known:
            d["extraction"] = self.extraction
        return d

    def check_dim(self, model_dim: int, where: str | Path) -> None:
        if self.dim is not None and self.dim != model_dim:
            raise CheckpointError(f"{where}: dim {self.dim!r} but the model (config.json) takes D={model_dim}")

    def check_store(self, store, *, allow_precision_mismatch: bool = False) -> None:
        """The contract against a feature store's metadata (``store``: ``path``, ``dim``,
        ``backbone``, ``meta``): the same D and backbone, and the same extraction precision
        unless ``allow_precision_mismatch``; else :class:`BackboneMismatchError` /
        :class:`PrecisionMismatchError` naming the store."""
        if self.dim is not None and store.dim != self.dim:
            raise BackboneMismatchError(f"{store.path}: features have D={store.dim}, the model expects D={self.dim}")
        want, got = self.backbone, store.backbone
        if want and got and want != got:
            raise BackboneMismatchError(f"{store.path}: features come from backbone {got!r}, the model was trained "
                                        f"on {want!r}; extract features with the same backbone")
        want_p = (self.extraction or {}).get("backbone_precision")
        got_p = (store.meta.get("extra") or {}).get("backbone_precision")
        if want_p and got_p and want_p != got_p and not allow_precision_mismatch:
            raise PrecisionMismatchError(
                f"{store.path}: features were extracted at precision {got_p}, the model was trained on "
                f"{want_p} features; re-extract with `sgmft extract --precision {want_p}` or accept the "
                "difference with --allow-precision-mismatch (allow_precision_mismatch=True)")

    # -- what raw posts need: the settings of sgmft extract, and what could not be verified --------
    @property
    def precision(self) -> str | None:
        """The precision the training features were extracted at (None: not recorded)."""
        return (self.extraction or {}).get("backbone_precision")

    @property
    def image_choice(self) -> str:
        """The image choice of the training features; ``"similar"`` (the default) when not recorded."""
        from sgmft.features.encode import IMAGE_CHOICES

        choice = (self.extraction or {}).get("image_choice")
        return choice if choice in IMAGE_CHOICES else "similar"

    def clean_config(self):
        """The text cleaning of the training features (a ``CleanConfig``), None when not recorded
        (the default cleaning applies). A jieba user dictionary that is missing here is a
        ``FileNotFoundError``: texts would not be cleaned as in training."""
        cc = (self.extraction or {}).get("clean_config")
        if not isinstance(cc, dict):
            return None
        cfg = clean_config_from(cc)
        if cfg.user_dict and not Path(cfg.user_dict).is_file():
            raise FileNotFoundError(
                f"the training features were cleaned with the jieba user dictionary {cfg.user_dict}, "
                "which is missing here; restore it or pass clean_cfg= explicitly")
        return cfg

    def check_cleaner(self, clean_cfg) -> list[str]:
        """A note when ``clean_cfg`` (a ``CleanConfig``) cleans otherwise than training did
        (settings, jieba version or stop-word lists: the recorded fingerprint differs)."""
        from sgmft.ingest.text import TextCleaner

        want = (self.extraction or {}).get("clean_fingerprint")
        if clean_cfg is None or not want or TextCleaner(clean_cfg).fingerprint() == want:
            return []
        return ["text cleaning differs from training (settings, jieba version or stop-word lists changed): cleaned "
                "texts may not match the training features"]

    def unknown_notes(self, model_dir: Path) -> list[str]:
        """Notes for a contract that does not say how raw posts were made: features not made by
        ``sgmft extract``, or an old checkpoint whose training store could not be read."""
        if not self.extraction_known:
            store = _training_store(model_dir)
            return [f"checkpoint {model_dir} predates the feature contract in features.json and its training store "
                    f"{store or '(not recorded)'} is not readable: using the default text cleaning and image choice "
                    "'similar'; the backbone weights are not verified (retrain, or keep the store, to record them)"]
        if not self.extraction:
            return [f"the model {model_dir} was trained on features not made by `sgmft extract` (no cleaning "
                    "settings recorded): using the default text cleaning and image choice 'similar'"]
        return []

    def raw_backbone_spec(self, where: str | Path = "the model") -> str:
        """The spec of the backbone that encodes raw posts for this model; an :class:`InputError`
        when none is recorded or the features come from no registered backbone (SimFeat, the
        user's own), saying how to predict instead."""
        from sgmft.features.backbones import BACKBONES

        spec = self.backbone
        if not spec or spec == "unknown":
            raise InputError(f"{where}: the checkpoint does not record the backbone its features came from; pass "
                             "backbone= (--backbone SPEC)")
        if spec.partition(":")[0] not in BACKBONES:
            raise InputError(
                f"{where}: the model was trained on features from {spec!r}, which is not a raw-post backbone (a "
                "SimFeat store or features you computed yourself), so it cannot encode a raw post: it predicts only "
                "from features. Predict on a feature store with `sgmft predict RUN --store STORE --out preds.csv` "
                "(Predictor.predict_store in Python), or pass --backbone SPEC if the features did come from a "
                f"registered backbone ({', '.join(BACKBONES.names())})")
        return spec

    def check_precision(self, got: str, *, where: str | Path = "the model",
                        allow_precision_mismatch: bool = False) -> list[str]:
        """A backbone running at precision ``got`` against the recorded one: nothing when they
        agree (or none is recorded), else :class:`PrecisionMismatchError`, or a note with
        ``allow_precision_mismatch``."""
        trained = self.precision
        if not trained or got == trained:
            return []
        msg = (f"{where} was trained on features extracted at precision {trained}, but the backbone would run at "
               f"{got}: features differ slightly between precisions")
        if not allow_precision_mismatch:
            raise PrecisionMismatchError(
                f"{msg}. Use the training precision (the default; --precision {trained}), or accept the "
                "difference with --allow-precision-mismatch (allow_precision_mismatch=True)")
        return [msg + " (allowed by --allow-precision-mismatch)"]

    def check_backbone(self, bb, *, where: str | Path = "the model", check_fingerprint: bool = True,
                       allow_precision_mismatch: bool = False) -> list[str]:
        """The one check of a loaded backbone ``bb`` against the contract: its width, its
        precision and its fingerprint (weights, tokenizer, preprocessing, precision).

        Raises :class:`BackboneMismatchError` (a fingerprint or width that differs; with
        ``check_fingerprint=False`` a fingerprint difference becomes a note) and
        :class:`PrecisionMismatchError` (another precision, unless
        ``allow_precision_mismatch``: then the weights are verified at the recorded precision).
        Returns notes for what could not be verified."""
        notes: list[str] = []
        ext = self.extraction or {}
        if self.dim is not None and bb.dim != self.dim:
            raise BackboneMismatchError(
                f"backbone {bb.spec!r} gives D={bb.dim} features, but {where} was trained on D={self.dim} "
                f"features from {self.backbone!r}; use that backbone")
        trained_prec = ext.get("backbone_precision")
        notes += self.check_precision(bb.precision, where=where, allow_precision_mismatch=allow_precision_mismatch)
        want_fp = ext.get("backbone_fingerprint")
        if trained_prec and bb.precision != trained_prec:   # verify the weights at the trained precision
            got_fp = bb.fingerprint_at(trained_prec)
            if got_fp is None:
                notes.append(f"backbone {bb.spec!r} cannot be verified at precision {trained_prec} (its fingerprint "
                             "is only known at its own precision); make sure it is the training backbone")
                want_fp = None
        else:
            got_fp = bb.fingerprint()
        if want_fp and got_fp != want_fp:
            msg = (f"backbone {bb.spec!r} is not the one {where} was trained on ({self.backbone!r}): its "
                   "fingerprint (weights, tokenizer, preprocessing, precision) differs, so its features would "
                   "not match")
            if check_fingerprint:
                raise BackboneMismatchError(msg + "; pass the training backbone (or check_backbone=False)")
            notes.append(msg)
        elif not want_fp and self.backbone and bb.spec != self.backbone:
            notes.append(f"backbone {bb.spec!r} differs from the training spec {self.backbone!r} and cannot be "
                         "verified (no fingerprint recorded); make sure it is the same model")
        return notes


def clean_config_from(d: dict):
    """A ``CleanConfig`` from its recorded dict (unknown keys ignored, lists as tuples)."""
    import dataclasses

    from sgmft.ingest.text import CleanConfig

    names = {f.name for f in dataclasses.fields(CleanConfig)}
    return CleanConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def feature_contract(store_meta: dict) -> dict:
    """``features.json`` for a model trained on a store with metadata ``store_meta``."""
    return FeatureContract.from_store_meta(store_meta).to_dict()


def save_checkpoint(out_dir, model: torch.nn.Module, model_cfg: ModelConfig, label_names,
                    feature_meta: dict, train_cfg: TrainConfig | None = None, preset: str = "",
                    calibration: dict | None = None) -> Path:
    """Write the checkpoint folder atomically. ``feature_meta``: the training store's metadata;
    ``calibration``: the post-hoc calibration record (:func:`calibration_entry`), if fitted."""
    return write_model_folder(out_dir, model, model_cfg, label_names, FeatureContract.from_store_meta(feature_meta),
                              asdict(train_cfg) if train_cfg else None, preset, calibration=calibration)


def write_model_folder(out_dir, model: torch.nn.Module, model_cfg: ModelConfig, label_names,
                       contract: "FeatureContract | dict", train: dict | None = None, preset: str = "",
                       extra_files: dict[str, str] | None = None, calibration: dict | None = None) -> Path:
    """Write the checkpoint folder atomically from its parts (``contract``: features.json, a
    :class:`FeatureContract` or its dict); ``extra_files``: more text files (name -> content),
    e.g. the model card README.md. Written at :data:`SCHEMA_VERSION`."""
    if not isinstance(contract, FeatureContract):
        contract = FeatureContract.from_dict(contract)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        _write_json(tmp / "config.json", {"format": "sgmft-checkpoint", "version": SCHEMA_VERSION, "preset": preset,
                                          "model": model_view(model_cfg), "train": train,
                                          **calibration_entry(calibration)})
        _write_json(tmp / "labels.json", list(label_names))
        _write_json(tmp / "features.json", contract.to_dict())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def check_label_names(labels, num_classes: int, where: Path) -> list[str]:
    """``labels.json`` must name each of the model's classes once, in index order."""
    if not isinstance(labels, list) or not all(isinstance(n, str) and n for n in labels):
        raise CheckpointError(f"{where}: must be a JSON list of non-empty label names, got {str(labels)[:80]}")
    if len(labels) != num_classes:
        raise CheckpointError(f"{where}: {len(labels)} label name(s) for a model with {num_classes} classes; "
                              "the list must name every class once, in index order")
    dup = sorted({n for n in labels if labels.count(n) > 1})
    if dup:
        raise CheckpointError(f"{where}: label name(s) {dup} repeated")
    return list(labels)


def _training_store(model_dir: Path) -> str | None:
    """The training store a run's ``run.json`` records (``store``), or None."""
    run = locate(model_dir)[1] or (RunDir(model_dir) if (model_dir / "run.json").is_file() else None)
    store = (run.read_run_json() or {}).get("store") if run is not None else None
    return store if isinstance(store, str) and store else None


def _training_store_meta(model_dir: Path) -> dict | None:
    """The metadata of the store a run was trained on (``run.json``'s ``store``), or None when
    the run, its record or the store is gone. Only the version-1 migration needs it."""
    store = _training_store(model_dir)
    if store is None:
        return None
    try:
        meta = json.loads((Path(store) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def _migrate_v1(cfg_data: dict, features: dict, model_dir: Path) -> tuple[dict, dict]:
    """Version 1 -> 2: a folder written before the feature contract has no ``extraction`` in
    features.json; take it from the training store's metadata when that is still readable,
    else leave it unknown (the predictor then uses the defaults and says so)."""
    if "extraction" not in features:
        meta = _training_store_meta(model_dir)
        if meta is not None:
            features = {**features, "extraction": FeatureContract.from_store_meta(meta).extraction}
    return {**cfg_data, "version": 2}, features


# version -> the function that lifts a folder of that version one step up
MIGRATIONS = {1: _migrate_v1}


def migrate(cfg_data: dict, features: dict, model_dir: Path) -> tuple[dict, dict, int]:
    """Bring a checkpoint's config.json and features.json (parsed) up to :data:`SCHEMA_VERSION`
    through :data:`MIGRATIONS`; returns them and the version read. A newer version is refused."""
    where = model_dir / "config.json"
    version = cfg_data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{where}: 'version' must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise CheckpointError(f"{where}: checkpoint schema version {version} was written by a newer sgmft; this "
                              f"one reads versions up to {SCHEMA_VERSION}. Upgrade sgmft (pip install -U sgmft)")
    v = version
    while v < SCHEMA_VERSION:
        cfg_data, features = MIGRATIONS[v](cfg_data, features, model_dir)
        v += 1
    return cfg_data, features, version


def _check_files(p: Path) -> None:
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such model folder (give a run folder or its model/ folder)")
    missing = [f for f in FILES if not (p / f).exists()]
    if missing:
        raise CheckpointError(f"{p}: not an sgmft checkpoint (missing {', '.join(missing)})")
    for f in FILES:                          # a FIFO or device would block; a huge JSON exhaust memory
        q = p / f
        if not q.is_file():
            raise CheckpointError(f"{q}: not a regular file")
        if f.endswith(".json") and q.stat().st_size > 64 * 2**20:
            raise CheckpointError(f"{q}: {q.stat().st_size} bytes, too large for a checkpoint's JSON file")


def read_checkpoint(path) -> dict:
    """Read and check a checkpoint folder's JSON files (not the weights), migrated to
    :data:`SCHEMA_VERSION`. Returns the ``info`` dict of :func:`load_checkpoint`: model_cfg,
    label_names, contract (:class:`FeatureContract`), features (its dict), preset, train,
    calibration, path, version (the version read) and run (the run folder or None)."""
    p, run = locate(path)
    _check_files(p)
    cfg_data = _read_json(p / "config.json")
    labels = _read_json(p / "labels.json")
    features = _read_json(p / "features.json")
    if not isinstance(cfg_data, dict) or cfg_data.get("format") != "sgmft-checkpoint":
        got = cfg_data.get("format") if isinstance(cfg_data, dict) else type(cfg_data).__name__
        raise CheckpointError(f"{p / 'config.json'}: format is {got!r}, expected 'sgmft-checkpoint'")
    if not isinstance(cfg_data.get("model"), dict):
        raise CheckpointError(f"{p / 'config.json'}: has no 'model' section")
    if not isinstance(features, dict):
        raise CheckpointError(f"{p / 'features.json'}: must be a JSON object")
    cfg_data, features, version = migrate(cfg_data, features, p)
    model_cfg = model_config_from_dict(cfg_data["model"], f"{p / 'config.json'}: model")
    labels = check_label_names(labels, model_cfg.num_classes, p / "labels.json")
    contract = FeatureContract.from_dict(features, p / "features.json")
    contract.check_dim(model_cfg.dim, p / "features.json")
    return {"model_cfg": model_cfg, "label_names": labels, "contract": contract, "features": contract.to_dict(),
            "preset": cfg_data.get("preset", ""), "train": cfg_data.get("train"),
            "calibration": read_calibration(cfg_data, p / "config.json"), "path": p,
            "version": version, "run": run}


def load_checkpoint(path, map_location: str = "cpu"):
    """Return ``(model in eval mode, info dict)``; info as :func:`read_checkpoint`.

    Every file is checked and a problem is a :class:`CheckpointError` naming it: corrupt
    JSON, a schema version newer than this sgmft reads, a truncated or corrupt
    ``model.safetensors``, weights that do not fit the config or are not finite,
    ``labels.json`` with another number of names than the model has classes,
    ``features.json`` with another width than the model's.
    """
    info = read_checkpoint(path)
    p, model_cfg = info["path"], info["model_cfg"]
    model = build_model(model_cfg)
    weights = p / "model.safetensors"
    try:
        state = load_file(str(weights), device=map_location)
    except Exception as e:          # SafetensorError (truncated, bad header), OSError, ...
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{weights}: unreadable (truncated or corrupt safetensors file: {first})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{weights}: weights do not match the config ({first})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad:
        raise CheckpointError(f"{weights}: weight {bad!r} holds NaN or Inf values; the model is unusable")
    model.eval()
    return model, info


# -- post-hoc calibration (docs/predict.md, "When to trust a probability") ---------------------
#: What a checkpoint without a calibration record means: the raw softmax (temperature 1).
NO_CALIBRATION = {"method": "none", "temperature": 1.0, "uniform_weight": 0.0}
CALIBRATION_METHODS = ("temperature_uniform", "temperature", "none")


def calibration_entry(record: dict | None) -> dict:
    """The optional ``"calibration"`` entry of ``config.json``: ``{}`` when there is none.
    ``record``: ``{"method": ..., "temperature": T, "uniform_weight": eps, ...}`` (the
    probabilities are (1 - eps) softmax(logits / T) + eps / K; statistics of the fit, e.g.
    the validation NLL and ECE before and after, may ride along)."""
    if record is None:
        return {}
    read_calibration({"calibration": record}, "calibration record")      # refuse a bad one before writing
    return {"calibration": dict(record)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_calibration(cfg_data: dict, where) -> dict:
    """The calibration record of a parsed ``config.json``; :data:`NO_CALIBRATION` when absent
    (checkpoints written before calibration existed, or trained with ``calibration: none``).
    ``uniform_weight`` defaults to 0."""
    rec = cfg_data.get("calibration")
    if rec is None:
        return dict(NO_CALIBRATION)
    ok = isinstance(rec, dict) and rec.get("method") in CALIBRATION_METHODS
    t, w = (rec.get("temperature"), rec.get("uniform_weight", 0.0)) if ok else (None, None)
    if not (ok and _number(t) and 0 < t < float("inf") and _number(w) and 0 <= w < 1):
        raise CheckpointError(f"{where}: 'calibration' must be {{\"method\": one of {', '.join(CALIBRATION_METHODS)}, "
                              f"\"temperature\": a positive number, \"uniform_weight\": a number in [0, 1)}}, "
                              f"got {str(rec)[:120]}")
    return {**rec, "temperature": float(t), "uniform_weight": float(w)}

"""Configuration dataclasses and named presets.

A *preset* is a YAML file in ``sgmft/configs/models/`` with a ``model`` section (a
:class:`ModelConfig`) and an optional ``train`` section (a :class:`TrainConfig`).
Users may also pass a path to their own YAML file wherever a preset name is accepted.

The two configs are pydantic dataclasses (decision and reason: docs/design.md,
"Configuration"): they stay ordinary dataclasses for the rest of the code (``asdict``,
``dataclasses.replace``, ``fields``, equality), and every value is parsed and checked on
construction and assignment: ``"true"``/``"false"`` become booleans, ``"64"`` an int, a
choice outside its set is an error that lists the allowed values. Their defaults are the
recommended preset ``sgmft`` (a test holds ``ModelConfig() == load_preset("sgmft").model``).

One coercion rule goes beyond pydantic's: a single number given for a list field
(``classifier_hidden=64``) is the one-element list ``[64]``.

:class:`ModelConfig` is one flat record, but an architecture reads only part of it: the shared
fields, the SG-MFT-family fields it names, and its own typed options (kept in ``extra``). That
declaration lives with each model class (``reads``, ``Options``: :mod:`sgmft.models.options`); the
models layer checks a config against it (:func:`sgmft.models.registry.resolve_model`, which refuses
a field the arch does not read and a misspelt option) and shows only what the arch reads
(:func:`sgmft.models.registry.model_view`: ``--print-config``, run.json, the model card, the
fingerprint). This module cannot import the models, so :func:`load_preset` and
:func:`apply_overrides` check types only; every path to a model (the CLI, training,
:func:`sgmft.models.build_model`) resolves.
"""

from __future__ import annotations

from sgmft.errors import ConfigError, InputError  # noqa: E402,I001  (user errors: SgmftError and ValueError)

import dataclasses
import difflib
import functools
import json
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as checked_dataclass
from pydantic.dataclasses import is_pydantic_dataclass

_CHECKED = ConfigDict(validate_assignment=True)

#: The preset ``sgmft train`` (and :func:`sgmft.train.train`) uses when none is given: ``auto``
#: trains TrustMix, TrustMix started from LDA and the shrinkage-LDA bar; chooses on the validation split
#: (docs/design.md, "The default model"). The ``sgmft`` and ``paper`` presets remain the paper's method.
DEFAULT_PRESET = "auto"


def _one_or_many(value):
    """A scalar for a list field means a one-element list (``64`` -> ``[64]``)."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return [value]
    return value


def parse_devices(value):
    """Lightning's ``devices``: an int (``-1`` = all), ``"auto"``, or a list of device indices
    (``[0, 1]`` or the string ``"0,1"``)."""
    if isinstance(value, str):
        v = value.strip()
        if v == "auto":
            return v
        if "," in v:
            try:
                return [int(x) for x in v.split(",") if x.strip()]
            except ValueError:
                return value          # let validation report it
        try:
            return int(v)
        except ValueError:
            return value
    return value


def _precision_str(value):
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Devices = Annotated[Union[int, list[Annotated[int, Field(ge=0)]], Literal["auto"]],
                    BeforeValidator(parse_devices)]
# Lightning's precision values (lightning.fabric.connector._PRECISION_INPUT), ints as strings
Precision = Annotated[Literal["transformer-engine", "transformer-engine-float16", "16-true", "16-mixed",
                              "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16"],
                      BeforeValidator(_precision_str)]


@checked_dataclass(config=_CHECKED)
class ModelConfig:
    """Every option of SG-MFT that SPEC.md names, plus the other architectures' options in ``extra``.

    Defaults are the recommended preset ``sgmft``; the paper-literal reading is the
    ``paper`` preset. ``dim`` and ``num_classes`` are normally filled in from the feature store.
    Shared by every architecture: arch, dim, num_classes, input_scale, input_norm; the others are
    read only by the architectures that declare them (``sgmft.models.registry.arch_reads``).
    """

    arch: str = "sgmft"             # a registered architecture (sgmft presets lists them)
    dim: PositiveInt = 1024         # D, the backbone's feature width
    num_classes: PositiveInt = 8
    # -- token view (SPEC "The token view"): the D-vector is n tokens of width d = D / n
    n_tokens: PositiveInt = 16      # n
    attn_dim: PositiveInt = 64      # d_model of every multi-head attention (divisible by heads)
    heads: PositiveInt = 8          # h
    input_scale: Union[Literal["sqrt_dim"], float] = "sqrt_dim"  # multiply features by this; "sqrt_dim" = unit-
                                    # variance coordinates: sqrt(D) on raw L2-normalised features, 1 after input_norm
    # input normalisation fitted on the training split (models/input_norm.py; docs/design.md "Input
    # normalisation"): "none" (raw features, the paper), "standardize" (mean, per-dimension scale) or
    # "whiten" (mean, Ledoit-Wolf shrinkage whitening)
    input_norm: Literal["none", "standardize", "whiten"] = "none"
    # -- SIM (section 3.2.1)
    use_sim: bool = True
    pm_norm: Literal["softmax", "sigmoid"] = "softmax"   # eq 3: softmax over the n positions (paper) or sigmoid
    pe_scale: Literal["none", "sqrt_d"] = "sqrt_d"       # eq 2/4 logits: "none" (paper) or divide by sqrt(d)
    ffn_mode: Literal["vector", "token"] = "token"       # eq 15: "vector" (whole D-vector, W1 in R^{D x d_h}) or "token"
    ffn_hidden: PositiveInt = 256   # d_h
    ffn_side: Literal["text", "image"] = "text"          # which modality gets the similarity-aware FFN (Table 4)
    norm_mode: Literal["auto", "token", "vector"] = "auto"  # LayerNorm over token width d, the whole vector, or auto
    # -- fusion (section 3.2.2); "sfm" is eq 17, others come from the fusion registry
    fusion: str = "sfm"
    sfm_residual: bool = True       # eq 17 literal (False) or each cross-attention "layer" with its
                                    # query's residual: CA(t,i) + F^S_text + CA(i,t) + F^S_image
    sfm_merge: Literal["sum", "concat"] = "concat"       # eq 17's (+): element-wise "sum" (paper) or "concat" (R^{2D})
    # -- classifier (eq 18): 5 linear layers = 4 hidden widths + the output layer
    classifier_hidden: Annotated[list[PositiveInt], BeforeValidator(_one_or_many), Field(min_length=1)] = \
        field(default_factory=lambda: [512, 256, 128, 64])
    dropout: Fraction = 0.1
    # -- speed: "auto" (exact moment kernel when d == 1, else sdpa), "moments", "rank1" (exact
    #    fused kernel, d == 1), "sdpa", "naive"
    attn_impl: Literal["auto", "sdpa", "naive", "rank1", "moments"] = "auto"
    # -- the architecture's own typed options (its class's ``Options``, models/options.py), e.g. TrustMix's
    #    ``hidden``; resolved (every option, defaults filled in) by sgmft.models.registry.resolve_model
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def token_dim(self) -> int:
        return self.dim // self.n_tokens

    def resolved_norm_mode(self) -> str:
        if self.norm_mode == "auto":
            return "vector" if self.token_dim < 16 else "token"
        return self.norm_mode

    def resolved_input_scale(self) -> float:
        if self.input_scale == "sqrt_dim":
            return 1.0 if self.input_norm != "none" else float(self.dim) ** 0.5
        return float(self.input_scale)

    def validate(self) -> "ModelConfig":
        """Checks across fields (each field's own type and range are checked on construction)."""
        def bad(msg: str) -> None:
            raise ConfigError(f"model config: {msg}")

        if self.dim % self.n_tokens:
            bad(f"n_tokens={self.n_tokens} must divide dim={self.dim} (token width d = D / n)")
        if self.attn_dim % self.heads:
            bad(f"attn_dim={self.attn_dim} must be divisible by heads={self.heads}")
        if self.attn_impl in ("rank1", "moments") and self.token_dim != 1:
            bad(f"attn_impl={self.attn_impl!r} needs token width d = 1 (n_tokens == dim)")
        return self


@checked_dataclass(config=_CHECKED)
class TrainConfig:
    """Optimisation and run settings. Defaults are the recommended preset ``sgmft``; the
    paper's optimiser (section 4.2: lr 1e-5, batch 20, 30 epochs) is the ``paper`` preset."""

    lr: Annotated[float, Field(gt=0.0)] = 5e-4
    betas: tuple[Fraction, Fraction] = (0.9, 0.99)
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    batch_size: PositiveInt = 128
    epochs: PositiveInt = 10
    seed: int = 0
    val_fraction: Fraction = 0.1    # of the training split, for model selection
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2   # used when the store carries no split
    split: Literal["stratified", "user"] = "stratified"  # "stratified" (paper) or "user" (user-disjoint)
    num_workers: Annotated[int, Field(ge=0)] = 0
    accelerator: str = "auto"       # Lightning's: auto, cpu, gpu, cuda, mps, ...
    devices: Devices = 1            # an int, "auto", or device indices [0, 1] ("0,1" on the command line)
    strategy: str = "auto"          # Lightning's: auto, ddp, ddp_spawn, fsdp, ...
    num_nodes: PositiveInt = 1
    precision: Precision = "32-true"
    progress: bool | None = None    # progress bars; None = on when stderr is a terminal
    tensorboard: bool = False       # TensorBoard event files in <run>/tensorboard/, beside lightning/metrics.csv
    deterministic: bool = True
    max_steps: Annotated[int, Field(ge=-1)] = -1   # for smoke tests; -1 = run all epochs
    # a budget that fits the data size (docs/training.md, "Budget"): at least this many optimiser steps, so
    # `epochs` is raised on small stores (300 posts at batch 128 would otherwise give 20 steps); 0 = off
    min_steps: Annotated[int, Field(ge=0)] = 0
    limit_train_batches: Union[int, float] = 1.0
    # post-hoc calibration fitted on the validation split after training (docs/predict.md):
    # "temperature_uniform": p = (1 - eps) softmax(z / T) + eps / K, T and eps fitted by NLL;
    # "temperature": eps = 0 (Guo et al. 2017); "none". The argmax never changes.
    calibration: Literal["temperature_uniform", "temperature", "none"] = "temperature_uniform"
    # the fraction of the validation split kept out of epoch selection and used only to fit the
    # calibration (docs/predict.md, "Calibrating on posts that chose nothing"); 0 = one split for both
    calibration_holdout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # which epoch's weights the run keeps (docs/training.md, "Which epoch is kept"): the highest validation
    # accuracy, or the lowest validation loss (NLL; TrustMix's preset: its accuracy peaks early and noisily)
    select_on: Literal["val_acc", "val_loss"] = "val_acc"


def progress_enabled(flag: bool | None) -> bool:
    """An explicit on/off wins; ``None`` means on only when stderr is a terminal."""
    if flag is not None:
        return bool(flag)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig
    # a selecting preset (``auto``): train each of these presets and keep the one with the best
    # validation accuracy (sgmft.train.select); its own ``train`` section gives the shared split and seed
    candidates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples become lists)."""
        if self.candidates:
            return json.loads(json.dumps({"name": self.name, "description": self.description,
                                          "candidates": list(self.candidates), "train": asdict(self.train)}))
        return json.loads(json.dumps({"name": self.name, "description": self.description,
                                      "model": asdict(self.model), "train": asdict(self.train)}))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# fields that older configs (run.json, checkpoints' config.json, YAML) may still hold: ignored
RETIRED_FIELDS = {"ModelConfig": {"rank1_chunk"}}

# what a field takes, where pydantic's per-branch messages would say it worse
_FIELD_HINTS = {
    "betas": "a list of 2 numbers in [0, 1), e.g. [0.9, 0.99]",
    "devices": "an integer (-1 = all), 'auto', or device indices such as 0,1",
    "limit_train_batches": "a fraction (float) or a number of batches (int)",
}
_EXPECTED = {
    "bool_parsing": "true or false", "bool_type": "true or false",
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping",
}


def _expected(err: dict) -> str:
    t, ctx = err["type"], err.get("ctx") or {}
    if t == "literal_error":
        allowed = str(ctx.get("expected", "")).replace(" or ", ", ")
        return f"one of: {allowed}" if "," in allowed else allowed
    if t in _EXPECTED:
        return _EXPECTED[t]
    if t in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[t]
        return f"a value {op} {next(iter(ctx.values()))}"
    if t in {"too_short", "too_long"}:
        return err["msg"].lower().replace("list should have", "a list with").replace("tuple should have", "a list with")
    return err["msg"]


def explain_validation_error(err: ValidationError, where: str, data: dict | None = None,
                             names=None, label=None) -> str:
    """A one-line message per field: ``<where>: <field>=<value> is not allowed; expected <what>``.
    ``names``: the config's field names (default: ModelConfig's and TrainConfig's); ``label`` shows a
    field under another name (``sgmft serve`` shows its flags: ``--max-queue``)."""
    names = _FIELD_NAMES if names is None else set(names)
    by_field: dict[str, tuple[Any, list[str]]] = {}
    for e in err.errors():
        loc = [x for x in e["loc"] if isinstance(x, int) or x in names]
        name = str(loc[0]) if loc else ".".join(map(str, e["loc"])) or "value"
        name += "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
        top = str(loc[0]) if loc else name
        if top in _FIELD_HINTS:
            name, w = top, _FIELD_HINTS[top]
        else:
            w = _expected(e)
        given = data[name] if data and name in _FIELD_HINTS and name in data else e.get("input")
        if label is not None and top in names:
            name = label(top) + name[len(top):]
        given, wants = by_field.setdefault(name, (given, []))
        if w not in wants:
            wants.append(w)
    parts = [f"{name}={given!r} is not allowed; expected {' or '.join(wants)}"
             for name, (given, wants) in by_field.items()]
    return f"{where}: " + "; ".join(parts)


_FIELD_NAMES = {f.name for cls in (ModelConfig, TrainConfig) for f in fields(cls)}


# -- the one configuration grammar (issue 19): every config of sgmft (ModelConfig, TrainConfig,
# SimFeatConfig, ServeConfig, CleanConfig) is built from a mapping and takes ``key=value`` overrides
# through the functions below, and every mistake is one ConfigError of one shape:
#   <where>: unknown <Config> field(s) [...]; known: [...]                  (a mapping)
#   override <section>.<key>=<value>: unknown field '<key>' of <Config> (did you mean ...?); known: ...
#   override <section>.<key>=<value>: <key>=<value> is not allowed; expected <what is allowed>
#   <where>: <a check across fields, in the config's own words>
# A pydantic dataclass (ModelConfig, TrainConfig, ServeConfig) is checked by its own constructor; a
# plain frozen dataclass (SimFeatConfig, CleanConfig: their constructors stay as they are, so SimFeat's
# data and the cleaners' pickles do not change) has its values checked against its field types by a
# pydantic twin (:func:`_field_checker`) before it is built.
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.lru_cache(maxsize=None)
def _field_checker(cls):
    """A pydantic dataclass with ``cls``'s fields, types and defaults and nothing else (no methods,
    no ``__post_init__``): it checks and coerces values for a plain dataclass ``cls``."""
    if is_pydantic_dataclass(cls):
        return cls
    hints, spec = _field_types(cls), []
    for f in fields(cls):
        default = (field(default=f.default) if f.default is not dataclasses.MISSING
                   else field(default_factory=f.default_factory))
        spec.append((f.name, hints[f.name], default))
    return checked_dataclass(dataclasses.make_dataclass(cls.__name__, spec), config=_CHECKED)


def _checked_values(cls, data: dict[str, Any], where: str, label=None) -> dict[str, Any]:
    """``data``'s values checked and coerced against ``cls``'s field types (``"64"`` -> 64)."""
    try:
        inst = _field_checker(cls)(**data)
    except ValidationError as e:
        raise ConfigError(explain_validation_error(e, where, data, [f.name for f in fields(cls)], label)) from None
    return {k: getattr(inst, k) for k in data}


def _build(cls, data: dict[str, Any], where: str, label=None):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS.get(cls.__name__, ())}
    unknown = set(data) - known
    if unknown:
        close = [m for k in sorted(unknown) for m in difflib.get_close_matches(k, sorted(known), n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"{where}: unknown {cls.__name__} field(s) {sorted(unknown)}{hint}; "
                         f"known: {sorted(known)}")
    values = _checked_values(cls, data, where, label)
    try:
        return cls(**values)
    except InputError as e:            # a check across fields in the config's __post_init__
        raise ConfigError(f"{where}: {e}") from None


def build_config(cls, data: dict[str, Any], where: str = "config", label=None):
    """A ``cls`` (any config dataclass of sgmft) from the mapping ``data``: unknown fields, bad values and
    failed checks across fields are one :class:`ConfigError` that names ``where``, the field, the
    value and what is allowed. ``label`` shows field names otherwise (``sgmft serve``: its flags)."""
    return _build(cls, data, where, label)


def model_config_from_dict(data: dict[str, Any], where: str = "model config") -> ModelConfig:
    return _build(ModelConfig, data, where)


def train_config_from_dict(data: dict[str, Any], where: str = "train config") -> TrainConfig:
    return _build(TrainConfig, data, where)


def _preset_dir():
    return resources.files("sgmft") / "configs" / "models"


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def find_yaml(name_or_path: str | Path, folder, kind: str, known) -> tuple[str, str]:
    """``(name, text)`` of a named YAML config: a path to a ``.yaml``/``.yml`` file (named by its stem),
    or a name in the packaged ``folder``. The one lookup of presets (:func:`load_preset`) and experiment
    tables (:mod:`sgmft.experiments.tables`); an unknown name lists ``known()``."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} and p.exists():
        return p.stem, p.read_text(encoding="utf-8")
    res = folder / f"{name_or_path}.yaml"
    if not res.is_file():
        from sgmft.errors import UnknownNameError

        raise UnknownNameError(f"unknown {kind} {str(name_or_path)!r}; known: {', '.join(known())} "
                               "(or give a path to a .yaml file)")
    return str(name_or_path), res.read_text(encoding="utf-8")


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a packaged preset by name, or a user YAML file by path."""
    name, text = find_yaml(name_or_path, _preset_dir(), "preset", list_presets)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {name}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name}: expected a mapping with model/train sections")
    # "preset": the name `sgmft train --print-config` writes above its model and train sections (the
    # printed YAML loads back as a preset file); informational only
    unknown = set(data) - {"description", "model", "train", "candidates", "preset"}
    if unknown:
        raise ConfigError(f"preset {name}: unknown section(s) {sorted(unknown)}")
    return Preset(
        name=name,
        description=str(data.get("description", "")).strip(),
        model=model_config_from_dict(data.get("model") or {}, f"preset {name}: model"),
        train=train_config_from_dict(data.get("train") or {}, f"preset {name}: train"),
        candidates=_candidates(data.get("candidates"), name),
    )


def _candidates(value, name: str) -> list[str]:
    """A selecting preset's candidate presets: a list of packaged preset names, none selecting, and
    ensembles ``a+b`` of candidates listed before them (models/ensemble.py, eq E1')."""
    if value is None:
        return []
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"preset {name}: candidates must be a non-empty list of preset names")
    for i, v in enumerate(value):
        if "+" in v:
            parts = v.split("+")
            if len(parts) < 2 or len(set(parts)) != len(parts) or any(p not in value[:i] or "+" in p for p in parts):
                raise ConfigError(f"preset {name}: ensemble candidate {v!r} must join two or more different "
                                  "plain candidates listed before it, e.g. trust_lda+lda")
        elif load_preset(v).candidates:
            raise ConfigError(f"preset {name}: candidate {v!r} selects itself; candidates must be plain presets")
    return list(value)


def parse_value(text: str):
    """An override's value as YAML (``true``, ``64``, ``[64, 32]``); unparseable text stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _split_override(item: str, section: str) -> tuple[str, str]:
    """``key=value`` -> (key, value text); a leading ``<section>.`` on the key is dropped
    (``simfeat.test_size=500`` is ``test_size=500`` of the simfeat section)."""
    prefix = f"{section}." if section else ""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {prefix}{item!r} must look like key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if prefix and key.startswith(prefix):
        key = key[len(prefix):]
    return key, value


def _override_value(cls, key: str, text: str):
    """The value of ``key=text``: YAML, except that a plain text field takes the text as written unless
    it is quoted (``profile=123`` is the string "123", ``join_with=|`` is "|", ``allowed_hosts=*.x.com``
    is not a YAML alias)."""
    if _field_types(cls).get(key) is str and text.strip()[:1] not in ("'", '"'):
        return text.strip() or text
    return parse_value(text)


def _unknown_field(cls, key: str, where: str) -> ConfigError:
    known = sorted(f.name for f in fields(cls))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown field {key!r} of {cls.__name__}{hint}; known: {', '.join(known)}")


def parse_overrides(cls, overrides: list[str] | None, section: str = "", label=None) -> dict[str, Any]:
    """``key=value`` strings -> ``{field: value}`` for the config dataclass ``cls``, each value parsed as
    YAML and checked against the field's type (``seed=4`` -> 4, ``fine_regimes=false`` -> False). For a
    config that is built later from these values (SimFeat: a profile plus overrides); ``section``
    names the overrides in errors (``override simfeat.seed=x: ...``)."""
    prefix = f"{section}." if section else ""
    known = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for item in overrides or []:
        key, value = _split_override(item, section)
        where = f"override {prefix}{item.strip()}"
        if key not in known:
            raise _unknown_field(cls, key, where)
        out[key] = _checked_values(cls, {key: _override_value(cls, key, value)}, where, label)[key]
    return out


def apply_overrides(obj, overrides: list[str] | None, section: str = "", label=None):
    """Apply ``key=value`` strings (value parsed as YAML, then checked against the field's
    type) to a config dataclass, returning a new one. ``section`` (``"model"``/``"train"``/
    ``"simfeat"``/``"serve"``/``"clean"``) only names the override in error messages. On a
    ModelConfig, ``extra.<option>=V`` sets one option and ``extra={a: 1}`` merges into ``extra``
    (never replacing it); the option's name and type are the architecture's to check
    (:func:`sgmft.models.registry.apply_model_overrides` also takes ``<option>=V`` and refuses
    fields the arch does not read). Checks across fields run once, after the last override."""
    if not overrides:
        return obj
    cls = type(obj)
    known = {f.name for f in fields(obj)}
    data = asdict(obj)
    prefix = f"{section}." if section else ""
    for item in overrides:
        key, value = _split_override(item, section)
        where = f"override {prefix}{item.strip()}"
        if "extra" in known and (key == "extra" or key.startswith("extra.")):
            data["extra"] = _merge_extra(data["extra"], key, parse_value(value), where)
            continue
        if key not in known:
            raise _unknown_field(cls, key, where)
        data[key] = _override_value(cls, key, value)
        data.update(_checked_values(cls, data, where, label))      # names the offending item
    return _build(cls, data, f"{section} overrides" if section else "overrides", label)


def _merge_extra(extra: dict, key: str, value, where: str) -> dict:
    """``extra`` with ``extra.<name>=value`` set, or with the mapping ``extra=value`` merged in."""
    if key == "extra":
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: extra takes a mapping of options, e.g. extra={{hidden: 256}}")
        return {**extra, **value}
    name = key[len("extra."):]
    if not name or "." in name:
        raise ConfigError(f"{where}: write extra.<option>=<value>, e.g. extra.hidden=256")
    return {**extra, name: value}


def replace_checked(obj, where: str = "config", **changes):
    """``dataclasses.replace`` whose bad values end as one clear ValueError naming ``where``."""
    return _build(type(obj), {**asdict(obj), **changes}, where)


def to_json(obj) -> str:
    return json.dumps(asdict(obj), indent=2, sort_keys=True)

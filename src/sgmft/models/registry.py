"""Model and fusion-module registries.

A model factory takes a :class:`~sgmft.config.ModelConfig` and returns an ``nn.Module``
whose ``forward(text, image, text_mask=None, image_mask=None)`` returns a
:class:`~sgmft.models.output.ModelOutput`.  A fusion factory takes the config and returns
a module mapping token tensors (B, n, d) x 2 to (B, out_dim), with an ``out_dim`` attribute.

A model class declares what it reads from the config (:mod:`sgmft.models.options`): ``reads``, the
flat ModelConfig fields beyond the shared ones, and ``Options``, its typed options kept in
``ModelConfig.extra``. Here configs are checked against that declaration (:func:`resolve_model`,
:func:`apply_model_overrides` for ``--set model.<name>=V``) and shown as what the arch reads
(:func:`model_view`: ``--print-config``, run.json, the model card, the fingerprint);
:func:`options_markdown` writes the tables of docs/training.md from the same declarations.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from sgmft.config import ConfigError, ModelConfig, apply_overrides, parse_value
from sgmft.models.options import SHARED_FIELDS, ArchOptions, validate_options
from sgmft.registry import Registry

MODELS: Registry = Registry("model")
FUSIONS: Registry = Registry("fusion module")

_FLAT = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "extra")


# -- what an architecture reads (models/options.py) ----------------------------------------------
def arch_reads(arch: str) -> tuple[str, ...]:
    """The flat ModelConfig fields ``arch`` reads: the shared ones plus its class's ``reads``. A
    model registered without ``reads`` is taken to read every flat field (nothing is refused)."""
    reads = getattr(MODELS.get(arch), "reads", None)
    if reads is None:
        return _FLAT
    bad = [f for f in reads if f not in _FLAT]
    if bad:
        raise TypeError(f"model {arch!r}: reads names {bad}, which are not ModelConfig fields")
    return tuple(dict.fromkeys(SHARED_FIELDS + tuple(reads)))


def arch_options(arch: str) -> type[ArchOptions] | None:
    """``arch``'s typed options (kept in ``ModelConfig.extra``), or None where it declares none (then
    ``extra`` is passed on unchecked, for a model registered before typed options)."""
    opts = getattr(MODELS.get(arch), "Options", None)
    if opts is None:
        return None
    if not (isinstance(opts, type) and issubclass(opts, ArchOptions)):
        raise TypeError(f"model {arch!r}: Options must be a subclass of sgmft.models.options.ArchOptions")
    clash = set(opts.model_fields) & set(_FLAT + ("extra",))
    if clash:
        raise TypeError(f"model {arch!r}: options {sorted(clash)} have the names of ModelConfig fields")
    return opts


def describe_arch(arch: str) -> str:
    """``arch``'s options in one line, for error messages."""
    reads = [f for f in arch_reads(arch) if f != "arch"]
    opts = arch_options(arch)
    names = reads + [f"{o} (extra)" for o in (opts.model_fields if opts else ())]
    return f"arch {arch!r} takes: {', '.join(names)}"


def resolve_model(cfg: ModelConfig, *, strict: bool = True, given=(), where: str = "model config",
                  cross_checks: bool = True) -> ModelConfig:
    """``cfg`` checked against what its architecture reads, with ``extra`` resolved to every option of
    the arch (defaults filled in, types checked): the one resolution step of configs (presets,
    overrides, ``--print-config``, the start of training, :func:`build_model`).

    ``strict`` (config time) also refuses a flat field the arch does not read when it is in ``given``
    (the fields a user set explicitly) or differs from the ModelConfig default: a setting that
    would change nothing must not be recorded as if it did. Loading a saved config uses
    ``strict=False`` (old run.json and checkpoints list every flat field). ``cross_checks`` (e.g.
    ``n_tokens`` divides ``dim``) wait for ``dim`` where it is still to come from the store."""
    reads = arch_reads(cfg.arch)
    if "fusion" in reads:
        FUSIONS.get(cfg.fusion)
    if strict:
        default = ModelConfig()
        stray = [f for f in _FLAT if f not in reads and (f in given or getattr(cfg, f) != getattr(default, f))]
        if stray:
            raise ConfigError(f"{where}: {', '.join(stray)} {'is' if len(stray) == 1 else 'are'} not read by "
                              f"arch {cfg.arch!r}, so setting it would change nothing; {describe_arch(cfg.arch)}")
    opts = arch_options(cfg.arch)
    if opts is not None:
        cfg = dataclasses.replace(cfg, extra=validate_options(cfg.arch, opts, cfg.extra, where))
        if strict:
            cfg = _settle_unread_options(cfg, opts, given, where)
    if cross_checks:
        _cross_checks(cfg, reads, where)
    return cfg


def _unread_options(cfg: ModelConfig, opts) -> dict[str, str]:
    """The options of ``cfg`` (``extra`` resolved) that its other options leave unread, with when each is read."""
    return opts(**cfg.extra).unread()


def _settle_unread_options(cfg: ModelConfig, opts, given, where: str) -> ModelConfig:
    """As for flat fields, an option that the other options leave unread must not be set: one the user set
    (in ``given``) is refused, and so, in a config without overrides (``given`` empty: a file, a Python
    object), is one away from its default. With overrides, an option that only the preset set and the
    overrides made unread (``init=random`` on ``trust_mda``: its ``start_shrinkage``) goes back to its
    default, so the config reads the same as one written without it."""
    defaults = opts.defaults()
    unread = _unread_options(cfg, opts)
    stray = {k: when for k, when in unread.items()
             if f"extra.{k}" in given or k in given or (not given and cfg.extra[k] != defaults[k])}
    if stray:
        what = "; ".join(f"{k} is read only when {when}" for k, when in stray.items())
        raise ConfigError(f"{where}: arch {cfg.arch!r}: {what}, so setting {'it' if len(stray) == 1 else 'them'} "
                          "here would change nothing; leave it out or change what it depends on")
    return dataclasses.replace(cfg, extra={**cfg.extra, **{k: defaults[k] for k in unread}})


def _cross_checks(cfg: ModelConfig, reads: tuple[str, ...], where: str) -> None:
    """ModelConfig.validate's checks across fields, for the fields the arch reads."""
    def bad(msg: str) -> None:
        raise ConfigError(f"{where}: {msg}")

    if "n_tokens" in reads and cfg.dim % cfg.n_tokens:
        bad(f"n_tokens={cfg.n_tokens} must divide dim={cfg.dim} (token width d = D / n)")
    if "heads" in reads and cfg.attn_dim % cfg.heads:
        bad(f"attn_dim={cfg.attn_dim} must be divisible by heads={cfg.heads}")
    if "attn_impl" in reads and cfg.attn_impl in ("rank1", "moments") and cfg.token_dim != 1:
        bad(f"attn_impl={cfg.attn_impl!r} needs token width d = 1 (n_tokens == dim)")


def model_view(cfg: ModelConfig) -> dict[str, Any]:
    """What ``cfg``'s architecture reads, as plain JSON types: the shared fields, its flat fields and
    (if it has options) ``extra`` with every option resolved. ``--print-config``, run.json, the
    model card and the run's fingerprint show this; it loads back (as YAML or JSON) to the same
    config."""
    cfg = resolve_model(cfg, strict=False, cross_checks=False)
    full = json.loads(json.dumps(dataclasses.asdict(cfg)))
    reads = arch_reads(cfg.arch)
    view = {k: full[k] for k in _FLAT if k in reads}           # in ModelConfig's order
    opts = arch_options(cfg.arch)
    if (opts.model_fields if opts is not None else cfg.extra):
        unread = _unread_options(cfg, opts) if opts is not None else {}
        view["extra"] = {k: v for k, v in full["extra"].items() if k not in unread}
    return view


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def apply_model_overrides(cfg: ModelConfig, overrides: list[str] | None, section: str = "model") -> ModelConfig:
    """``key=value`` overrides of a model config, resolved strictly: ``key`` is ``arch`` (applied
    first), a flat field the arch reads, or one of its options (``hidden=256``, or the alias
    ``extra.hidden=256``; merged into ``extra``, never replacing it). A field the arch does not read
    or an unknown name is a ConfigError that lists what the arch takes."""
    items = list(overrides or [])
    arch_items = [i for i in items if _key(i) == "arch"]
    cfg = apply_overrides(cfg, arch_items, section)
    opts, reads = arch_options(cfg.arch), arch_reads(cfg.arch)
    given, rest = set(), []
    for item in items:
        key = _key(item)
        if item in arch_items or "=" not in item:
            rest.append(item)                      # apply_overrides reports a missing "="
            continue
        if opts is not None and key in opts.model_fields:
            item, key = f"extra.{item.strip()}", f"extra.{key}"
        elif key in _FLAT and key not in reads:
            raise ConfigError(f"override {section}.{item}: {key} is not read by arch {cfg.arch!r}, so it would "
                              f"change nothing; {describe_arch(cfg.arch)}")
        elif key not in _FLAT and key != "extra" and not key.startswith("extra."):
            raise ConfigError(f"override {section}.{item}: unknown option {key!r}; {describe_arch(cfg.arch)}")
        given.add(key)
        given.update(_extra_keys(item) if key == "extra" else ())
        rest.append(item)
    cfg = apply_overrides(cfg, rest, section)
    return resolve_model(cfg, given=given, where=f"{section} config", cross_checks=False)


def _extra_keys(item: str) -> list[str]:
    """``extra={a: 1, b: 2}`` -> ``["extra.a", "extra.b"]``: the options a dict override sets (for the
    unread-option check; a value that is not a mapping is left to ``apply_overrides`` to report)."""
    value = parse_value(item.split("=", 1)[1])
    return [f"extra.{k}" for k in value] if isinstance(value, dict) else []


def build_model(cfg):
    """Instantiate the registered model ``cfg.arch`` (after resolving its config: :func:`resolve_model`,
    not strict), with its input normalisation buffers (identity until
    :func:`sgmft.models.input_norm.fit_input_norm`) when ``cfg.input_norm`` is not "none"."""
    cfg = resolve_model(cfg, strict=False)
    model = MODELS.get(cfg.arch)(cfg)
    mode = getattr(cfg, "input_norm", "none")
    if mode != "none":
        from sgmft.models.blocks import ModalityInput

        inputs = [(n, m) for n, m in model.named_modules() if isinstance(m, ModalityInput)]
        for name, m in inputs:
            if m.modality not in ("text", "image"):
                raise TypeError(f"{type(model).__name__}.{name}: a ModalityInput without modality='text'/'image' "
                                "cannot take input normalisation")
            m.enable_norm(mode, m.modality)
    return model


def list_models() -> list[str]:
    return MODELS.names()


def forward_batch(model, batch: dict):
    """Run a registered model on a batch dict (``text``, ``image``, optional ``*_mask``)."""
    return model(batch["text"], batch["image"], batch.get("text_mask"), batch.get("image_mask"))


def training_loss(model, out, y, index=None):
    """The training loss of a registered model's output ``out`` on labels ``y``: CE (eq 19) +
    a label-free ``out.aux_loss`` + the model's ``aux_loss_fn(out, y)`` if any (unimodal /
    contrastive terms of the UniS-MMC- and BalanceMLA-style heads; a model with
    ``aux_loss_wants_index`` also gets the batch's store rows ``index``, for QMF's per-post
    history). Needs no Lightning: the training module and the model matrix test call it."""
    import torch.nn.functional as F

    loss_fn = getattr(model, "loss_fn", None)          # a model's own likelihood of the label (TrustMix eq T7)
    loss = loss_fn(out, y) if loss_fn is not None else F.cross_entropy(out.logits, y)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    aux_fn = getattr(model, "aux_loss_fn", None)
    if aux_fn is not None:
        extra = {"index": index} if getattr(model, "aux_loss_wants_index", False) else {}
        loss = loss + aux_fn(out, y, **extra)
    return loss


# -- the options tables of docs/training.md (generated; tests/test_options.py checks the doc) -----
def _type_text(annotation, metadata=()) -> str:
    """A field's type in words: ``int >= 0``, ``` `auto` or float in [0, 1]```, ``list of float > 0``."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_text(args[0], tuple(metadata) + tuple(getattr(args[1], "metadata", ()) or ())
                          + tuple(a for a in args[1:] if not hasattr(a, "metadata")))
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin is typing.Union:
        return " or ".join(_type_text(a) for a in args)
    if origin is list:
        return "list of " + _type_text(args[0]) if args else "list"
    text = getattr(annotation, "__name__", str(annotation))
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    cons = [f"{op} {getattr(m, k)}" for m in metadata for k, op in bounds.items() if getattr(m, k, None) is not None]
    return text + (" " + ", ".join(cons) if cons else "")


def _preset_options(arch: str) -> dict | None:
    """The resolved options of the packaged preset named like ``arch``, if there is one of that arch."""
    from sgmft.config import list_presets, load_preset

    if arch not in list_presets():
        return None
    cfg = load_preset(arch).model
    return resolve_model(cfg, strict=False, cross_checks=False).extra if cfg.arch == arch else None


def options_markdown() -> str:
    """The options of every registered architecture as Markdown (docs/training.md, "Model options"):
    the flat fields each one reads, then a table of its typed options. Regenerate the doc block with
    ``python -c "from sgmft.models.registry import options_markdown; print(options_markdown())"``."""
    shared = ", ".join(f"`{f}`" for f in SHARED_FIELDS)
    lines = [f"Every architecture reads the shared fields {shared}.", "",
             "| arch | flat fields it also reads (`--set model.<field>=V`) | options (`--set model.<option>=V`) |",
             "|---|---|---|"]
    for arch in list_models():
        flat = [f for f in arch_reads(arch) if f not in SHARED_FIELDS]
        opts = arch_options(arch)
        names = list(opts.model_fields) if opts is not None else []
        lines.append(f"| `{arch}` | {', '.join(f'`{f}`' for f in flat) or '-'} | "
                     f"{', '.join(f'`{o}`' for o in names) or '-'} |")
    for arch in list_models():
        opts = arch_options(arch)
        if opts is None or not opts.model_fields:
            continue
        defaults, preset = opts.defaults(), _preset_options(arch)
        col = f" preset `{arch}` |" if preset is not None else ""
        lines += ["", f"`{arch}` options (`--set model.<option>=V`, or `model.extra.<option>=V`):", "",
                  f"| option | type | default |{col} meaning |", "|---|---|---|" + ("---|" if col else "") + "---|"]
        for name, f in opts.model_fields.items():
            kind = _type_text(f.annotation, f.metadata).replace("|", "\\|")
            meaning = (f.description or "").replace("|", "\\|")
            cell = f" `{json.dumps(preset[name])}` |" if preset is not None else ""
            lines.append(f"| `{name}` | {kind} | `{json.dumps(defaults[name])}` |{cell} {meaning} |")
    return "\n".join(lines)

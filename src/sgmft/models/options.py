"""What each architecture reads from the model config (issue 19, "configs that cannot lie").

:class:`~sgmft.config.ModelConfig` is one flat record; an architecture reads only part of it:

* the **shared** fields, read by every architecture: :data:`SHARED_FIELDS`;
* the flat SG-MFT-family fields it uses (the token view, attention, FFN, classifier), named by
  the model class's ``reads`` tuple (e.g. ``concat`` reads :data:`CLASSIFIER_FIELDS`);
* its own typed options, a pydantic model in the class's ``Options`` attribute (a subclass of
  :class:`ArchOptions`), stored resolved (every option, defaults filled in) in ``ModelConfig.extra``.

:func:`sgmft.models.registry.resolve_model` checks a config against this declaration and
:func:`sgmft.models.registry.model_view` shows only what the architecture reads (``--print-config``,
run.json, the model card, the run's fingerprint). This module only declares; it imports no torch.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from sgmft.config import explain_validation_error
from sgmft.errors import ConfigError

__all__ = ["ArchOptions", "CLASSIFIER_FIELDS", "SGMFT_FIELDS", "SHARED_FIELDS", "TOKEN_FIELDS",
           "ATTENTION_FIELDS", "NoOptions", "OneOrMany", "option", "validate_options"]

#: read by every architecture (inputs and output size)
SHARED_FIELDS = ("arch", "dim", "num_classes", "input_scale", "input_norm")
#: the 5-layer classifier of eq 18 and the dropout of every block
CLASSIFIER_FIELDS = ("classifier_hidden", "dropout")
#: one multi-head attention on the token view (blocks.Attention)
ATTENTION_FIELDS = ("n_tokens", "attn_dim", "heads", "norm_mode", "attn_impl")
#: a transformer layer on the token view: attention + FFN (blocks.TransformerSublayers)
TOKEN_FIELDS = ATTENTION_FIELDS + ("ffn_mode", "ffn_hidden")
#: SG-MFT itself (sections 3.2.1-3.2.2): SIM, the fusion slot and the classifier
SGMFT_FIELDS = TOKEN_FIELDS + ("use_sim", "pm_norm", "pe_scale", "ffn_side", "fusion", "sfm_residual",
                               "sfm_merge") + CLASSIFIER_FIELDS


def _one_or_many(value):
    """A scalar for a list option means a one-element list (``0.1`` -> ``[0.1]``), as in ModelConfig."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return [value]
    return value


OneOrMany = BeforeValidator(_one_or_many)


class ArchOptions(BaseModel):
    """Base of an architecture's typed options: unknown names are errors, values are checked on
    construction (``"0.5"`` -> 0.5), the object is frozen. Each field's ``description`` is its
    line in the options table of docs/training.md (generated: :func:`sgmft.models.registry.options_markdown`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option's default, as plain JSON types."""
        return cls().model_dump(mode="json")

    def unread(self) -> dict[str, str]:
        """The options these values leave unread, each with the condition under which it is read
        (``{"proj_dim": "gate is true"}``): the model view leaves them out and a config that sets one
        is refused (:func:`sgmft.models.registry.resolve_model`). None by default."""
        return {}


class NoOptions(ArchOptions):
    """The options of an architecture that has none of its own (``extra`` must stay empty)."""


def option(default, description: str, **constraints):
    """A documented option field (``Field`` with its description for the generated docs table)."""
    return Field(default, description=description, **constraints)


NonNegInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]


def validate_options(arch: str, options: type[ArchOptions], given: dict[str, Any], where: str = "model config"
                     ) -> dict[str, Any]:
    """``given`` (``ModelConfig.extra``) checked against ``options`` and merged over its defaults:
    every option, as plain JSON types. An unknown name or a bad value is a ConfigError naming
    the arch, the option and what it takes."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: extra must be a mapping of {arch!r} options, got {type(given).__name__}")
    unknown = set(given) - set(options.model_fields)
    if unknown:
        raise ConfigError(f"{where}: arch {arch!r} does not know extra option(s) {sorted(unknown)}; "
                          f"known: {sorted(options.model_fields)}")
    try:
        return options(**given).model_dump(mode="json")
    except ValidationError as e:
        raise ConfigError(explain_validation_error(e, f"{where}: arch {arch!r} option")) from None

"""Model and fusion-module registries.

A model factory takes a :class:`~sgmft.config.ModelConfig` and returns an ``nn.Module``
whose ``forward(text, image, text_mask=None, image_mask=None)`` returns a
:class:`~sgmft.models.output.ModelOutput`.  A fusion factory takes the config and returns
a module mapping token tensors (B, n, d) x 2 to (B, out_dim), with an ``out_dim`` attribute.
"""

from sgmft.registry import Registry

MODELS: Registry = Registry("model")
FUSIONS: Registry = Registry("fusion module")


def build_model(cfg):
    """Instantiate the registered model ``cfg.arch`` (after validating the config), with its input
    normalisation buffers (identity until :func:`sgmft.models.input_norm.fit_input_norm`) when
    ``cfg.input_norm`` is not "none"."""
    cfg.validate()
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

    loss = F.cross_entropy(out.logits, y)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    aux_fn = getattr(model, "aux_loss_fn", None)
    if aux_fn is not None:
        extra = {"index": index} if getattr(model, "aux_loss_wants_index", False) else {}
        loss = loss + aux_fn(out, y, **extra)
    return loss
